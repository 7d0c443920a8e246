"""config_update is proven on a scratch copy before it is accepted; Barman's change queue is never left stuck."""

from __future__ import annotations

import json

import pytest

from pg_backup_api import cli
from pg_backup_api.barman_io import adapter as barman_adapter
from pg_backup_api.barman_io import commands as barman_cli
from pg_backup_api.core.model import OperationType
from pg_backup_api.worker import runner

# A change set Barman cannot apply: the file it names cannot be written, so `barman cron` fails on it forever.
STUCK_ENTRY = [{"section": "pg", "changes_set": [
    {"key": "description", "value": "x", "config_file": "/nonexistent/dir/pg.conf"}]}]


@pytest.fixture(autouse=True)
def model(barman_files):
    (barman_files.conf_dir / "pg-model.conf").write_text(
        "[pg-dr]\ncluster = pg\nmodel = true\ndescription = \"disaster recovery\"\n")


def post(client, *changes):
    return client.post("/operations", json={"type": "config_update", "changes": list(changes)})


def queue_file(barman_files):
    return barman_files.home / "cfg_changes.queue"


def server_summary(client, name="pg"):
    return next(s for s in client.get("/servers").json["servers"] if s["name"] == name)


# -- section names --------------------------------------------------------------------------

@pytest.mark.parametrize("change, field", [
    ({"scope": "server", "server_name": "barman", "description": "x"}, "changes.0.server_name"),
    ({"scope": "server", "server_name": "all", "description": "x"}, "changes.0.server_name"),
    ({"scope": "model", "model_name": "barman", "cluster": "pg"}, "changes.0.model_name"),
    ({"scope": "server", "server_name": "nope", "description": "x"}, "changes.0.server_name"),
    ({"scope": "server", "server_name": "pg-dr", "description": "x"}, "changes.0.server_name"),
    ({"scope": "model", "model_name": "pg", "description": "x"}, "changes.0.model_name"),
    ({"scope": "model", "model_name": "new-model", "cluster": "pg"}, "changes.0.model_name"),
])
def test_a_section_must_be_an_existing_server_or_model_and_never_reserved(client, barman_files, spawned,
                                                                           change, field):
    response = post(client, change)
    assert response.status_code == 400
    assert f"field '{field}'" in response.json["error"]
    assert spawned.calls == []
    assert not (barman_files.home / "jobs").exists() or not list((barman_files.home / "jobs").glob("*.json"))


def test_the_second_change_is_named_when_it_is_the_bad_one(client):
    response = post(client, {"scope": "server", "server_name": "pg", "description": "fine"},
                    {"scope": "server", "server_name": "barman", "description": "x"})
    assert response.status_code == 400
    assert "field 'changes.1.server_name'" in response.json["error"]


# -- values proven on a scratch copy ---------------------------------------------------------

@pytest.mark.parametrize("value", ["100% done", "%(name)s", "50%%"])
def test_a_value_with_a_percent_sign_is_refused_naming_the_key(client, barman_files, spawned, value):
    before = (barman_files.conf_dir / "pg.conf").read_text()
    response = post(client, {"scope": "server", "server_name": "pg", "archiver": "on", "description": value})
    assert response.status_code == 400
    assert "field 'changes.0.description'" in response.json["error"]
    assert "'%'" in response.json["error"]
    assert spawned.calls == []
    assert (barman_files.conf_dir / "pg.conf").read_text() == before  # the proof edits only a copy
    assert not queue_file(barman_files).exists()


def test_a_value_barman_would_refuse_is_refused_naming_the_key(client):
    response = post(client, {"scope": "server", "server_name": "pg", "active": "maybe"})
    assert response.status_code == 400
    assert "field 'changes.0.active'" in response.json["error"]
    assert "boolean" in response.json["error"]


def test_a_model_cannot_be_turned_into_a_server(client):
    response = post(client, {"scope": "model", "model_name": "pg-dr", "model": "false"})
    assert response.status_code == 400
    assert "field 'changes.0.model'" in response.json["error"]
    assert "no longer be a model" in response.json["error"]


def test_a_value_that_would_not_read_back_as_given_is_refused(client, barman_files):
    # Barman's edit_config inserts a new key before the next section without a newline: the
    # value would swallow the line after it. Only reading the edited copy back shows it.
    (barman_files.home / ".barman.auto.conf").write_text("[pg]\narchiver = on\n[pg-dr]\ncluster = pg\n")
    response = post(client, {"scope": "server", "server_name": "pg", "last_backup_maximum_age": "1 DAYS"})
    assert response.status_code == 400, response.json
    assert "field 'changes.0.last_backup_maximum_age'" in response.json["error"]


def test_a_key_changed_twice_ends_with_its_last_value(client):
    response = post(client, {"scope": "server", "server_name": "pg", "description": "first"},
                    {"scope": "server", "server_name": "pg", "description": "second"})
    assert response.status_code == 202, response.json


def test_a_malformed_entry_in_the_queue_blocks_config_update(client, barman_files):
    queue_file(barman_files).write_text(json.dumps([{"key": "description", "value": "x", "config_file": "/tmp/x"}]))
    response = post(client, {"scope": "server", "server_name": "pg", "description": "x"})
    assert response.status_code == 409
    assert "cannot apply" in response.json["error"]


def test_a_good_change_is_accepted_with_its_values_as_barman_writes_them(client, barman_files, spawned):
    response = post(client, {"scope": "server", "server_name": "pg", "description": "new words",
                             "archiver": True, "parallel_jobs": 2},
                    {"scope": "model", "model_name": "pg-dr", "description": "still a model"})
    assert response.status_code == 202, response.json
    op_id = response.json["operation_id"]
    assert spawned.calls == [("config_update", "", op_id)]
    job = json.loads((barman_files.home / "jobs" / f"{op_id}.json").read_text())
    assert job["changes"] == [
        {"scope": "server", "server_name": "pg", "description": "new words", "archiver": "true",
         "parallel_jobs": "2"},
        {"scope": "model", "model_name": "pg-dr", "description": "still a model"}]
    assert not queue_file(barman_files).exists()


def test_the_proven_change_is_the_one_barman_applies(barman_files):
    """The proof and the real edit agree: apply the proven change with Barman's own processor."""
    from barman.config import ConfigChangesProcessor

    config = barman_adapter.load_config(str(barman_files.conf))
    changes = barman_adapter.prove_config_changes(
        config, [{"scope": "server", "server_name": "pg", "description": "applied", "archiver": "on"}])
    processor = ConfigChangesProcessor(config.config)
    processor.receive_config_changes(changes)
    processor.process_conf_changes_queue()
    reloaded = barman_adapter.load_config(str(barman_files.conf)).server("pg")
    assert (reloaded.description, reloaded.archiver) == ("applied", True)
    assert "archiver = on" in (barman_files.home / ".barman.auto.conf").read_text()


# -- Barman's change queue -------------------------------------------------------------------

def fake_barman(tmp_path, queue, exit_code):
    """A stand-in for `barman config-update` that leaves a change set in the queue and exits."""
    script = tmp_path / "fake-barman"
    script.write_text(f"#!/bin/sh\ncat > '{queue}' <<'EOF'\n{json.dumps(STUCK_ENTRY)}\nEOF\n"
                      f"echo 'ERROR: Unable to process a set of changes. Exiting.'\nexit {exit_code}\n")
    script.chmod(0o755)
    return str(script)


def run_worker(client, barman_files, monkeypatch, tmp_path, exit_code):
    monkeypatch.setattr(barman_cli, "barman_executable",
                        lambda: fake_barman(tmp_path, queue_file(barman_files), exit_code))
    op_id = post(client, {"scope": "server", "server_name": "pg", "description": "new words"}).json["operation_id"]
    runner.run_operation(OperationType.CONFIG_UPDATE, str(barman_files.conf), None, op_id)
    return client.get(f"/operations/{op_id}").json


@pytest.mark.parametrize("before", [None, b"[]", b"[\n  garbage that Barman reads as an empty queue"])
def test_a_failed_config_update_puts_the_queue_back_exactly(client, barman_files, monkeypatch, tmp_path, before):
    if before is not None:
        queue_file(barman_files).write_bytes(before)
    status = run_worker(client, barman_files, monkeypatch, tmp_path, exit_code=1)
    assert (status["status"], status["exit_code"]) == ("FAILED", 1)
    assert "restored Barman's config change queue to its state before this operation" in status["output"]
    if before is None:
        assert not queue_file(barman_files).exists()
    else:
        assert queue_file(barman_files).read_bytes() == before
    assert client.get("/servers").json["config_changes_queue"]["stuck"] is False


def test_a_successful_config_update_leaves_the_queue_as_barman_left_it(client, barman_files, monkeypatch, tmp_path):
    status = run_worker(client, barman_files, monkeypatch, tmp_path, exit_code=0)
    assert status["status"] == "DONE"
    assert "restored" not in status["output"]
    assert json.loads(queue_file(barman_files).read_text()) == STUCK_ENTRY


def test_a_stuck_queue_is_reported_by_servers_and_blocks_config_update(client, barman_files):
    assert client.get("/servers").json["config_changes_queue"] == {
        "path": str(queue_file(barman_files)), "pending": 0, "stuck": False}
    queue_file(barman_files).write_text(json.dumps(STUCK_ENTRY))
    answer = client.get("/servers").json
    assert [s["name"] for s in answer["servers"]] == ["pg"]
    assert answer["config_changes_queue"] == {"path": str(queue_file(barman_files)), "pending": 1, "stuck": True}
    response = post(client, {"scope": "server", "server_name": "pg", "description": "x"})
    assert response.status_code == 409
    assert str(queue_file(barman_files)) in response.json["error"]


def test_changes_waiting_while_a_config_update_runs_are_not_stuck(client, barman_files):
    assert post(client, {"scope": "server", "server_name": "pg", "description": "x"}).status_code == 202
    queue_file(barman_files).write_text(json.dumps(STUCK_ENTRY))  # as barman has it while it runs
    assert client.get("/servers").json["config_changes_queue"]["stuck"] is False


def doctor(barman_files, monkeypatch, capsys):
    monkeypatch.setenv("PG_BACKUP_API_BARMAN_CONF", str(barman_files.conf))
    settings = barman_files.root / "pg-backup-api.conf"
    settings.write_text("[api]\n")
    monkeypatch.setenv("PG_BACKUP_API_CONFIG", str(settings))
    code = cli.main(["doctor"])
    return code, capsys.readouterr().out


def test_doctor_names_a_stuck_queue_and_exits_1(barman_files, monkeypatch, capsys):
    code, out = doctor(barman_files, monkeypatch, capsys)
    assert code == 0, out
    assert "no problem found" in out
    queue_file(barman_files).write_text(json.dumps(STUCK_ENTRY))
    code, out = doctor(barman_files, monkeypatch, capsys)
    assert code == 1
    assert f"FAIL config-changes-queue: {queue_file(barman_files)}: 1 change set(s) wait" in out
    assert "[pg] description = 'x' -> /nonexistent/dir/pg.conf" in out


def test_doctor_names_a_broken_configuration(barman_files, monkeypatch, capsys):
    (barman_files.home / ".barman.auto.conf").write_text("[barman]\ndescription = x\n")
    code, out = doctor(barman_files, monkeypatch, capsys)
    assert code == 1
    assert "FAIL barman-config" in out and "[barman] section" in out


# -- the service reads the configuration as `barman` does --------------------------------------

def test_changes_in_barman_auto_conf_are_seen_without_a_restart(client, barman_files):
    assert server_summary(client)["description"] == "test server pg"
    auto = barman_files.home / ".barman.auto.conf"
    auto.write_text("[pg]\ndescription = written by barman config-update\n")
    assert server_summary(client)["description"] == "written by barman config-update"
    auto.write_text("[barman]\ndescription = x\n")  # what `barman` itself refuses to load
    response = client.get("/servers")
    assert response.status_code == 503
    assert "[barman] section" in response.json["error"]
    auto.unlink()
    assert server_summary(client)["description"] == "test server pg"


def test_a_configuration_broken_from_the_start_heals_when_the_bad_file_goes(barman_files, spawned):
    from pg_backup_api import create_app
    from pg_backup_api.rules.settings import Settings

    bad = barman_files.conf_dir / "zz-bad.conf"
    bad.write_text("[all]\ndescription = reserved\n")
    client = create_app(Settings(barman_conf=str(barman_files.conf)), spawn=spawned).test_client()
    response = client.get("/servers")
    assert response.status_code == 503
    assert "reserved word 'all'" in response.json["error"]
    bad.unlink()
    assert client.get("/servers").status_code == 200


# -- values Barman's parser accepts but Barman's server refuses ------------------------------------

# Each: the changes, the key named, and what Barman (or the copy it would run) says.
REFUSED_BY_BARMANS_SERVER = [
    ({"network_compression": True}, "network_compression",
     "network_compression option is not supported by postgres backup_method"),
    ({"backup_compression": "zstd", "backup_compression_level": 999}, "backup_compression_level",
     "backup_compression_level 999 unsupported by compression algorithm"),
    ({"backup_compression": "gzip", "backup_compression_level": 42}, "backup_compression_level",
     "backup_compression_level 42 unsupported by compression algorithm"),
    ({"backup_compression": "lz4", "backup_compression_level": -5}, "backup_compression_level",
     "backup_compression_level -5 unsupported by compression algorithm"),
    ({"parallel_jobs": 0}, "parallel_jobs", "Number of processes must be at least 1"),
    ({"retention_policy": "RECOVERY WINDOW OF 14 DAYZ"}, "retention_policy",
     "Cannot parse option retention_policy: RECOVERY WINDOW OF 14 DAYZ"),
]
# A model file may set keys config_update does not take.
REFUSED_IN_A_MODEL = [*REFUSED_BY_BARMANS_SERVER,
                      ({"parallel_jobs_start_batch_size": 0}, "parallel_jobs_start_batch_size", "IndexError")]


def case_id(case):
    return f"{case[1]}-{list(case[0].values())[-1]}"


@pytest.mark.parametrize("values, key, message", REFUSED_BY_BARMANS_SERVER,
                         ids=[case_id(c) for c in REFUSED_BY_BARMANS_SERVER])
def test_a_value_barmans_server_refuses_is_refused_and_the_server_stays_enabled(client, barman_files, spawned,
                                                                                  values, key, message):
    before = (barman_files.conf_dir / "pg.conf").read_text()
    response = post(client, {"scope": "server", "server_name": "pg", "description": "fine", **values})
    assert response.status_code == 422, response.json
    assert f"field 'changes.0.{key}'" in response.json["error"]
    assert "server 'pg'" in response.json["error"]
    assert message in response.json["error"]
    assert spawned.calls == []
    assert (barman_files.conf_dir / "pg.conf").read_text() == before
    assert not queue_file(barman_files).exists()
    assert (server_summary(client)["disabled"], server_summary(client)["errors"]) == (False, [])


def test_the_change_that_breaks_barmans_server_is_named_among_good_ones(client):
    response = post(client, {"scope": "server", "server_name": "pg", "description": "fine"},
                    {"scope": "server", "server_name": "pg", "archiver": "on", "network_compression": "on"},
                    {"scope": "server", "server_name": "pg", "parallel_jobs": 4})
    assert response.status_code == 422, response.json
    assert "field 'changes.1.network_compression'" in response.json["error"]


@pytest.mark.parametrize("change", [{"description": "still disabled, as before"}, {"network_compression": False}])
def test_a_server_already_disabled_may_still_be_changed_or_fixed(client, barman_files, change):
    with open(barman_files.conf_dir / "pg.conf", "a") as conf:
        conf.write("network_compression = true\n")
    assert server_summary(client)["disabled"] is True
    response = post(client, {"scope": "server", "server_name": "pg", **change})
    assert response.status_code == 202, response.json


def active_model(barman_files, model, server="pg"):
    marker = barman_files.home / server / ".active-model.auto"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(model)


def test_a_change_of_the_active_model_that_barmans_server_refuses_is_refused(client, barman_files):
    active_model(barman_files, "pg-dr")
    assert server_summary(client)["active_model"] == "pg-dr"
    response = post(client, {"scope": "model", "model_name": "pg-dr", "network_compression": True})
    assert response.status_code == 422, response.json
    assert "field 'changes.0.network_compression'" in response.json["error"]
    assert "server 'pg'" in response.json["error"]
    assert "network_compression option is not supported by postgres backup_method" in response.json["error"]


@pytest.mark.parametrize("values, key, message", REFUSED_IN_A_MODEL, ids=[case_id(c) for c in REFUSED_IN_A_MODEL])
def test_a_config_switch_to_a_model_barmans_server_refuses_is_refused(client, barman_files, spawned,
                                                                        values, key, message):
    lines = "".join(f"{k} = {'true' if v is True else v}\n" for k, v in values.items())
    (barman_files.conf_dir / "pg-bad.conf").write_text(f"[pg-bad]\ncluster = pg\nmodel = true\n{lines}")
    response = client.post("/servers/pg/operations", json={"type": "config_switch", "model_name": "pg-bad"})
    assert response.status_code == 422, response.json
    assert "field 'model_name'" in response.json["error"]
    assert "model 'pg-bad'" in response.json["error"] and "server 'pg'" in response.json["error"]
    assert message in response.json["error"]
    assert spawned.calls == []
    assert client.post("/servers/pg/operations", json={"type": "config_switch", "model_name": "pg-dr"}
                       ).status_code == 202


def test_a_model_edited_then_switched_to_is_refused_at_the_switch(client, barman_files):
    # The model is not active: the edit breaks no server yet; switching to it would.
    assert post(client, {"scope": "model", "model_name": "pg-dr", "parallel_jobs": 0}).status_code == 202
    (barman_files.conf_dir / "pg-model.conf").write_text(
        "[pg-dr]\ncluster = pg\nmodel = true\nparallel_jobs = 0\n")  # as Barman's config-update writes it
    response = client.post("/servers/pg/operations", json={"type": "config_switch", "model_name": "pg-dr"})
    assert response.status_code == 422, response.json
    assert "parallel_jobs is 0" in response.json["error"]


def test_a_config_switch_reset_back_to_a_broken_section_is_refused(client, barman_files):
    with open(barman_files.conf_dir / "pg.conf", "a") as conf:
        conf.write("parallel_jobs = 0\n")
    (barman_files.conf_dir / "pg-model.conf").write_text("[pg-dr]\ncluster = pg\nmodel = true\nparallel_jobs = 2\n")
    active_model(barman_files, "pg-dr")
    response = client.post("/servers/pg/operations", json={"type": "config_switch", "reset": True})
    assert response.status_code == 422, response.json
    assert "field 'reset'" in response.json["error"] and "parallel_jobs is 0" in response.json["error"]


# -- GET /servers says what Barman's server says --------------------------------------------------

def test_get_servers_reports_a_server_barman_disables_with_barmans_messages(client, barman_files):
    with open(barman_files.conf_dir / "pg.conf", "a") as conf:
        conf.write("network_compression = true\n")
    summary = server_summary(client)
    assert summary["disabled"] is True
    assert summary["errors"] == ["network_compression option is not supported by postgres backup_method"]
    assert client.get("/servers/pg").json["disabled"] is True


def test_barmans_messages_are_not_repeated_by_later_reads_of_the_catalogue(client, barman_files):
    with open(barman_files.conf_dir / "pg.conf", "a") as conf:
        conf.write("network_compression = true\n")
    barman_files.add_backup("20261127T010000")
    for _ in range(3):  # each read builds Barman's Server, which appends its messages to what it is given
        assert client.get("/servers/pg/backups").status_code == 200
    assert server_summary(client)["errors"] == ["network_compression option is not supported by postgres backup_method"]
