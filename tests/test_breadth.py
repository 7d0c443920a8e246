"""Discovery endpoints, taking backups and configuration operations."""

import json

import pytest

from pg_backup_api.barman_io import commands as barman_cli


@pytest.fixture(autouse=True)
def catalogue(barman_files):
    barman_files.add_backup("20261127T010000", name="nightly")
    barman_files.add_backup("20261127T020000", status="FAILED")
    (barman_files.conf_dir / "pg-model.conf").write_text(
        "[pg-switched]\ncluster = pg\nmodel = true\ndescription = \"switched\"\n")


def job(barman_files, op_id, server="pg"):
    root = barman_files.home / server if server else barman_files.home
    return json.loads((root / "jobs" / f"{op_id}.json").read_text())


def test_servers_are_listed_with_their_summary(client):
    [server] = client.get("/servers").json["servers"]
    assert server["name"] == "pg"
    assert server["description"] == "test server pg"
    assert (server["active"], server["disabled"], server["backup_method"]) == (True, False, "postgres")


def test_backups_are_listed_oldest_first_with_their_status(client):
    backups = client.get("/servers/pg/backups").json["backups"]
    assert [(b["backup_id"], b["name"], b["status"]) for b in backups] == [
        ("20261127T010000", "nightly", "DONE"), ("20261127T020000", None, "FAILED")]
    assert backups[0]["end_time"] == "2026-11-27T01:00:02+00:00"


def test_one_backup_is_shown_by_id_name_or_exact_alias(client):
    for requested in ["20261127T010000", "nightly", "oldest", "first"]:
        assert client.get(f"/servers/pg/backups/{requested}").json["backup_id"] == "20261127T010000"
    assert client.get("/servers/pg/backups/last-failed").json["status"] == "FAILED"
    for missing in ["lates", "a", "20000101T000000"]:
        response = client.get(f"/servers/pg/backups/{missing}")
        assert response.status_code == 404
        assert missing in response.json["error"]


def test_discovery_of_an_unknown_server_is_404(client):
    for path in ["/servers/nope", "/servers/nope/backups", "/servers/nope/backups/latest", "/servers/nope/check"]:
        assert client.get(path).status_code == 404


def test_check_reports_each_line(client):
    result = client.get("/servers/pg/check").json
    assert result["server"] == "pg"
    assert result["ok"] is False  # the test server has no PostgreSQL behind it
    names = {c["name"]: c["status"] for c in result["checks"]}
    assert names["directories"] == "OK"
    assert names["postgresql"] == "FAILED"


def test_a_backup_operation_is_stored_and_started(client, barman_files, spawned):
    response = client.post("/servers/pg/operations", json={"type": "backup", "name": "before upgrade",
                                                            "immediate_checkpoint": True})
    assert response.status_code == 202
    op_id = response.json["operation_id"]
    assert spawned.calls == [("backup", "pg", op_id)]
    stored = job(barman_files, op_id)
    assert (stored["operation_type"], stored["name"], stored["immediate_checkpoint"]) == (
        "backup", "before upgrade", True)


def test_one_backup_of_a_server_at_a_time(client):
    first = client.post("/servers/pg/operations", json={"type": "backup"}).json["operation_id"]
    second = client.post("/servers/pg/operations", json={"type": "backup"})
    assert second.status_code == 409
    assert first in second.json["error"]


def test_incremental_parent_is_resolved_exactly(client, barman_files):
    op_id = client.post("/servers/pg/operations", json={"type": "backup", "incremental": "nightly"}).json[
        "operation_id"]
    assert job(barman_files, op_id)["incremental"] == "20261127T010000"


def test_config_switch_to_a_model_or_reset(client, barman_files, spawned):
    op_id = client.post("/servers/pg/operations", json={"type": "config_switch", "model_name": "pg-switched"})
    assert op_id.status_code == 202
    assert spawned.calls[-1][0] == "config_switch"
    done = client.post("/servers/pg/operations/" + op_id.json["operation_id"] + "/cancel")
    assert done.status_code == 200
    assert client.post("/servers/pg/operations", json={"type": "config_switch", "reset": True}).status_code == 202


@pytest.mark.parametrize("change, words", [
    ({"scope": "server", "server_name": "pg", "post_backup_script": "touch /tmp/x"}, "post_backup_script"),
    ({"scope": "server", "server_name": "pg", "ssh_command": "ssh evil"}, "ssh_command"),
    ({"scope": "server", "server_name": "pg", "conninfo": "host=evil"}, "conninfo"),
    ({"scope": "server", "server_name": "pg", "path_prefix": "/tmp"}, "path_prefix"),
    ({"scope": "server", "server_name": "pg", "basebackups_directory": "/tmp"}, "basebackups_directory"),
    ({"scope": "server", "server_name": "pg", "recovery_options": "get-wal"}, "recovery_options"),
    ({"scope": "global", "server_name": "pg", "archiver": "on"}, "scope"),
    ({"scope": "server", "model_name": "m", "archiver": "on"}, "needs 'server_name'"),
    ({"scope": "server", "server_name": "pg"}, "changes nothing"),
    ({"scope": "server", "server_name": "pg", "description": "a\nb"}, "description"),
])
def test_config_update_accepts_only_harmless_keys(client, change, words):
    response = client.post("/operations", json={"type": "config_update", "changes": [change]})
    assert response.status_code == 400
    assert words in response.json["error"]


def test_config_update_with_a_harmless_key_is_an_instance_operation(client, barman_files, spawned):
    change = {"scope": "server", "server_name": "pg", "description": "new words", "archiver": "on"}
    response = client.post("/operations", json={"type": "config_update", "changes": [change]})
    assert response.status_code == 202
    op_id = response.json["operation_id"]
    assert response.headers["Location"] == f"/operations/{op_id}"
    assert spawned.calls[-1] == ("config_update", "", op_id)
    assert job(barman_files, op_id, server=None)["changes"] == [change]
    assert client.get("/operations").json == {"operations": [{"id": op_id, "type": "config_update"}]}


def test_worker_argv_for_each_type():
    conf = "/etc/barman.conf"
    assert barman_cli.backup_argv(conf, "pg", {"name": "n", "immediate_checkpoint": False, "jobs": 2,
                                                   "bwlimit": 10, "incremental": "X", "wait_for_wals": True})[3:] \
        == ["backup", "--name=n", "--no-immediate-checkpoint", "--incremental=X", "--jobs=2", "--bwlimit=10",
            "--wait", "--", "pg"]
    assert barman_cli.config_switch_argv(conf, "pg", {"model_name": "m"})[3:] == ["config-switch", "--", "pg", "m"]
    assert barman_cli.config_switch_argv(conf, "pg", {"reset": True})[3:] == ["config-switch", "--reset", "--",
                                                                                   "pg"]
    changes = [{"scope": "server", "server_name": "pg", "archiver": "on"}]
    assert json.loads(barman_cli.config_update_argv(conf, changes)[-1]) == changes


def test_the_new_backup_id_is_read_from_barmans_output():
    output = ("Starting backup using postgres method for server pg in /var/lib/barman/pg/base/20261127T093201\n"
              "Backup start at LSN: 0/5000028\nBackup completed\n")
    assert barman_cli.new_backup_id(output) == "20261127T093201"
    assert barman_cli.new_backup_id("ERROR: nothing") is None
