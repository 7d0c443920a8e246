"""What a Barman of the supported range lacks: a 422 naming the version it needs, never a 500 or a 202 that
barman's own argument parser then fails; and the version shown wherever the service reports on itself.

The Barman installed for the unit tests is the newest the project pins; an older one is faked at the seam:
barman_adapter.features() (the version, and the probes of Barman's API), or an attribute of Barman's API
removed as an older release lacks it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pg_backup_api.barman_io import adapter as barman_adapter
from pg_backup_api.barman_io import commands as barman_cli
from pg_backup_api.barman_io import features as barman_features
from pg_backup_api.rules import schema

RECOVERY = {"type": "recovery", "destination_directory": "/srv/pg/restore", "remote_ssh_command": "ssh postgres@db2"}
OPENAPI = Path(schema.__file__).parent / "openapi.json"


@pytest.fixture
def barman_version(monkeypatch):
    """Make the service see a Barman of the given version (probes as that version has them)."""

    def fake(version: str) -> barman_features.BarmanFeatures:
        found = barman_features.from_version(version)
        monkeypatch.setattr(barman_adapter, "features", lambda: found, raising=False)
        return found

    return fake


@pytest.fixture
def fresh_probes():
    """Probe Barman's API again (an attribute was removed) and forget it afterwards."""
    barman_adapter.features.cache_clear()
    yield
    barman_adapter.features.cache_clear()


def test_backup_id_auto_on_barman_3_10_is_a_422_naming_the_version_it_needs(client, barman_files, barman_version,
                                                                               spawned):
    barman_files.add_backup("20261127T010000")
    barman_version("3.10.1")
    response = client.post("/servers/pg/operations", json={**RECOVERY, "backup_id": "auto",
                                                          "target_time": "2026-11-28T00:00:00+00:00"})
    assert response.status_code == 422
    assert response.json == {"error": "backup_id 'auto' needs Barman >= 3.13; this host has 3.10.1"}
    assert spawned.calls == []


def test_backup_id_auto_where_barman_lacks_the_closest_backup_lookup_is_a_422_not_a_500(
        client, barman_files, monkeypatch, fresh_probes):
    from barman.server import Server

    barman_files.add_backup("20261127T010000")
    monkeypatch.delattr(Server, "get_closest_backup_id_from_target_lsn")
    monkeypatch.delattr(Server, "get_closest_backup_id_from_target_time")  # as Barman < 3.13
    response = client.post("/servers/pg/operations", json={**RECOVERY, "backup_id": "auto", "target_lsn": "0/5000000"})
    assert response.status_code == 422, response.json
    assert response.json["error"].startswith("backup_id 'auto' needs Barman >= 3.13; this host has ")


def test_latest_full_where_barman_lacks_the_lookup_is_the_newest_full_backup_not_a_500(
        client, barman_files, monkeypatch):
    from barman.server import Server

    barman_files.add_backup("20261126T010000")
    barman_files.add_backup("20261127T010000")
    monkeypatch.delattr(Server, "get_last_full_backup_id")  # as Barman < 3.11
    assert client.get("/servers/pg/backups/latest-full").status_code != 500
    response = client.post("/servers/pg/operations", json={**RECOVERY, "backup_id": "latest-full"})
    assert response.status_code == 202, response.json


def test_latest_full_counts_every_full_backup_and_skips_incremental_ones(barman_files):
    barman_files.add_backup("20261126T010000")
    barman_files.add_backup("20261127T010000")
    barman_files.add_backup("20261128T010000", status="FAILED")
    incremental = barman_files.home / "pg" / "meta" / "20261129T010000-backup.info"
    barman_files.add_backup("20261129T010000")
    with open(incremental, "a") as info:
        info.write("parent_backup_id=20261127T010000\n")
    config = barman_adapter.load_config(str(barman_files.conf))
    backup = barman_adapter.resolve_backup(config.server("pg"), "latest-full")
    assert backup.backup_id == "20261127T010000"


def test_staging_wal_directory_on_barman_3_12_is_a_422_not_a_202_that_barman_then_refuses(
        client, barman_files, barman_version, spawned):
    barman_files.add_backup("20261127T010000")
    barman_version("3.12.1")
    response = client.post("/servers/pg/operations", json={**RECOVERY, "backup_id": "latest",
                                                          "staging_wal_directory": "/srv/pg/stage"})
    assert response.status_code == 422
    assert "'staging_wal_directory'" in response.json["error"]
    assert response.json["error"].endswith("needs Barman >= 3.13; this host has 3.12.1")
    assert spawned.calls == []


def test_an_incremental_backup_on_barman_3_10_is_a_422_not_a_202_that_barman_then_refuses(
        client, barman_files, barman_version, spawned):
    barman_files.add_backup("20261127T010000")
    barman_version("3.10.1")
    response = client.post("/servers/pg/operations", json={"type": "backup", "incremental": "latest"})
    assert response.status_code == 422
    assert response.json["error"] == ("field 'incremental' (barman backup --incremental) needs Barman >= 3.11; "
                                      "this host has 3.10.1")
    assert spawned.calls == []


def test_a_named_backup_with_wait_for_wals_on_barman_3_4_is_a_422_as_barman_would_lose_the_name(
        client, barman_version, spawned):
    barman_version("3.4.0")
    response = client.post("/servers/pg/operations", json={"type": "backup", "name": "n", "wait_for_wals": True})
    assert response.status_code == 422
    assert response.json["error"].endswith("needs Barman >= 3.5; this host has 3.4.0")
    assert client.post("/servers/pg/operations", json={"type": "backup", "name": "n"}).status_code == 202
    barman_features.from_version("3.5.0").require_for_request("backup", {"name": "n", "wait_for_wals": True})


@pytest.mark.parametrize("path, body", [
    ("/servers/pg/operations", {"type": "config_switch", "reset": True}),
    ("/operations", {"type": "config_update", "changes": [{"scope": "server", "server_name": "pg",
                                                           "description": "x"}]}),
])
def test_configuration_operations_on_barman_3_4_are_a_422_naming_the_version(client, barman_version, spawned,
                                                                            path, body):
    barman_version("3.4.0")
    response = client.post(path, json=body)
    assert response.status_code == 422
    assert response.json["error"] == f"type '{body['type']}' " + {
        "config_switch": "(configuration models)",
        "config_update": "(Barman's configuration change queue)"}[body["type"]] + \
        " needs Barman >= 3.10; this host has 3.4.0"
    assert spawned.calls == []


def test_what_the_running_barman_has_is_accepted(client, barman_files, spawned):
    barman_files.add_backup("20261127T010000")
    response = client.post("/servers/pg/operations", json={**RECOVERY, "backup_id": "latest",
                                                          "staging_wal_directory": "/srv/pg/stage"})
    assert response.status_code == 202, response.json


def test_get_servers_names_the_barman_version_and_what_it_lacks(client, barman_version):
    barman_version("3.10.1")
    barman = client.get("/servers").json["barman"]
    assert barman["version"] == "3.10.1"
    assert [(f["feature"], f["needs"]) for f in barman["lacks"]] == [
        ("incremental", "3.11"), ("auto", "3.13"), ("staging_wal_directory", "3.13")]
    barman_version("3.19.1")
    assert client.get("/servers").json["barman"] == {"version": "3.19.1", "lacks": []}


def test_metrics_have_a_barman_info_gauge_with_the_version(client, barman_version):
    barman_version("3.4.0")
    text = client.get("/metrics").get_data(as_text=True)
    assert ('pgba_barman_info{lacks="named_wait,config_switch,config_update,incremental,auto,staging_wal_directory",'
            'version="3.4.0"} 1.0') in text


def test_the_page_shows_the_barman_version_and_what_it_lacks(client, barman_version):
    barman_version("3.10.1")
    page = client.get("/ui/view").get_data(as_text=True)
    assert "Barman 3.10.1" in page
    assert "backup_id &#39;auto&#39; (needs Barman &gt;= 3.13)" in page


def test_doctor_reports_the_barman_version_and_what_it_lacks(app, barman_version):
    from pg_backup_api.service import doctor

    barman_version("3.10.1")
    findings = {f.check: f for f in doctor.run(app.extensions["pg_backup_api"])}
    assert findings["barman-version"].ok
    assert findings["barman-version"].message.startswith("Barman 3.10.1 lacks: field 'incremental'")


def test_the_served_openapi_document_marks_what_this_host_lacks(client, barman_version):
    barman_version("3.10.1")
    doc = client.get("/openapi.json").json
    assert doc["info"]["x-barman-version"] == "3.10.1"
    recovery = doc["components"]["schemas"]["RecoveryRequest"]["properties"]
    assert recovery["backup_id"]["description"].endswith(
        "Not on this host: backup_id 'auto' needs Barman >= 3.13; this host has 3.10.1.")
    assert "Not on this host" not in doc["components"]["schemas"]["ConfigUpdateRequest"]["description"]
    barman_version("3.19.1")
    assert "Not on this host" not in json.dumps(client.get("/openapi.json").json)


def test_the_shipped_openapi_marks_agree_with_the_feature_table():
    marks = {}

    def walk(node):
        if isinstance(node, dict):
            marks.update(node.get("x-barman-requires", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(OPENAPI.read_text()))
    assert set(barman_features.OFFERED) <= set(marks)
    for key, minimum in marks.items():
        assert barman_features.shown(barman_features.BY_KEY[key].minimum) == minimum


@pytest.mark.parametrize("version, restore", [("3.4.0", "recover"), ("3.11.1", "recover"), ("3.12.0", "restore"),
                                              ("3.20.1", "restore")])
def test_the_restore_command_follows_the_barman_version(version, restore):
    assert ("restore" if barman_features.from_version(version).has("restore_command") else "recover") == restore
    assert barman_cli.RESTORE_COMMAND == "restore"  # the installed Barman is >= 3.12


@pytest.mark.parametrize("text, parsed", [("3.4.0", (3, 4, 0)), ("3.10.1", (3, 10, 1)), ("3.13.0a1", (3, 13, 0)),
                                          ("3.20.1.dev0", (3, 20, 1)), ("4", (4,))])
def test_parse_version(text, parsed):
    assert barman_features.parse_version(text) == parsed


@pytest.mark.parametrize("version", ["3.3.2", "2.19", "4.0.0"])
def test_start_up_refuses_a_barman_outside_the_supported_range_with_one_line(barman_files, monkeypatch, version):
    import barman

    from pg_backup_api import create_app
    from pg_backup_api.rules.settings import Settings

    monkeypatch.setattr(barman, "__version__", version)
    with pytest.raises(SystemExit) as exited:
        create_app(Settings(barman_conf=str(barman_files.conf)), spawn=lambda *a: None)
    assert str(exited.value) == f"pg-backup-api needs Barman >= 3.4, < 4; this host has Barman {version}"


def test_the_worker_refuses_a_barman_below_the_supported_range_with_one_line(tmp_path):
    code = ("import barman, sys; barman.__version__ = '3.3.0'; sys.argv = ['pg-backup-api', 'run-backup', "
            "'--server-name', 'pg', '--operation-id', '20261127T010000']; from pg_backup_api import cli; "
            "sys.exit(cli.main())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PG_BACKUP_API_BARMAN_CONF": str(tmp_path / "none.conf"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["pg-backup-api needs Barman >= 3.4, < 4; this host has Barman 3.3.0"]


def test_barman_3_4s_configuration_loads_without_load_config_file_as_its_cli_loads_it(barman_files, monkeypatch):
    from barman.config import Config

    from pg_backup_api.barman_io import config as barman_config

    # As Barman < 3.10: no load_config_file, no `.barman.auto.conf`; the directory is read in one call.
    monkeypatch.delattr(Config, "load_config_file")
    monkeypatch.setattr(Config, "load_configuration_files_directory",
                        lambda self: [self._config.read(f) for f in barman_config.conf_dir_files(self)])
    config = barman_adapter.load_config(str(barman_files.conf))
    assert config.server_names == ["pg"]
    assert config.model_names == []


def test_a_barman_without_a_change_queue_reports_none_on_servers_metrics_and_doctor(client, app, monkeypatch):
    from pg_backup_api.barman_io import config as barman_config
    from pg_backup_api.service import doctor

    monkeypatch.setattr(barman_config, "has_change_queue", lambda config: False, raising=False)  # Barman < 3.10
    assert client.get("/servers").json["config_changes_queue"] == {"path": None, "pending": 0, "stuck": False}
    assert client.get("/metrics").status_code == 200
    findings = {f.check: f for f in doctor.run(app.extensions["pg_backup_api"])}
    assert findings["config-changes-queue"].ok
