"""Fault injection: what the client sees, and that nothing is lost, when things go wrong.

These run the real `spawn_worker` and `run_operation` (a detached `pg-backup-api recovery`
process) with a stand-in barman named by PG_BACKUP_API_BARMAN, as any user.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest

from pg_backup_api import cli, create_app
from pg_backup_api.core.model import OperationType, now_utc, timestamp
from pg_backup_api.rules.settings import Settings
from pg_backup_api.service import use_cases as service
from pg_backup_api.store import jobs as store
from pg_backup_api.worker import processes, runner

from .conftest import ROOT, install_stand_in_barman, operation_ended, operation_status, wait_for

BODY = {"type": "recovery", "backup_id": "latest", "destination_directory": "/srv/pg/restore",
        "remote_ssh_command": "ssh postgres@10.0.0.2"}

# The stand-in barman: notes each start (pid and arguments), then does what FAKE_BARMAN_MODE says.
FAKE_BARMAN = textwrap.dedent("""\
    #!/bin/sh
    echo "$$ $*" >> "$FAKE_BARMAN_STARTS"
    case "$FAKE_BARMAN_MODE" in
      succeed) echo "Starting remote restore for server pg"; echo "Restore operation completed" ;;
      fail) echo "ERROR: Cannot connect to remote host"; exit 2 ;;
      flood) i=0; while [ $i -lt 50000 ]; do echo "line $i: copying a file of the base backup"; i=$((i+1)); done ;;
      sleep) echo "Starting remote restore for server pg"; echo "Copying the base backup."; sleep 60 & wait ;;
      stubborn) trap '' TERM; echo started; while :; do sleep 0.1; done ;;
      straggler) (trap '' TERM; exec sleep 2 >/dev/null 2>&1) & echo "$!" > "$FAKE_BARMAN_STARTS.straggler"
                 echo started; sleep 60 & wait ;;
    esac
    """)


class FakeBarman:
    def __init__(self, path: Path, starts: Path, monkeypatch) -> None:
        self.path, self.starts_file, self.monkeypatch = path, starts, monkeypatch

    def mode(self, mode: str) -> None:
        self.monkeypatch.setenv("FAKE_BARMAN_MODE", mode)

    def starts(self) -> list:
        return self.starts_file.read_text().splitlines() if self.starts_file.exists() else []


@pytest.fixture
def fake_barman(tmp_path, monkeypatch, barman_files) -> FakeBarman:
    exe = install_stand_in_barman(tmp_path, monkeypatch, barman_files, FAKE_BARMAN)
    monkeypatch.setenv("FAKE_BARMAN_STARTS", str(tmp_path / "barman-starts"))
    fake = FakeBarman(exe, tmp_path / "barman-starts", monkeypatch)
    fake.mode("succeed")
    return fake


@pytest.fixture
def real_app(barman_files, fake_barman):
    """The service with the real spawn_worker."""
    return create_app(Settings(barman_conf=str(barman_files.conf), cancel_grace=0.5))


@pytest.fixture
def client(real_app):
    return real_app.test_client()


wait_for = partial(wait_for, interval=0.02)


def start(client, body=BODY):
    response = client.post("/servers/pg/operations", json=body)
    assert response.status_code == 202, response.json
    return response.json["operation_id"]


status = operation_status
ended = partial(operation_ended, interval=0.02)


def pg_store(barman_files) -> store.OperationStore:
    return store.OperationStore(barman_files.home / "pg", "pg")


def worker_file(barman_files, op_id) -> Path:
    return barman_files.home / "pg" / "jobs" / ".workers" / f"{op_id}.worker"


def write_job(barman_files, op_id, started, body=BODY):
    jobs = barman_files.home / "pg" / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    (jobs / f"{op_id}.json").write_text(json.dumps(
        {"operation_type": "recovery", "start_time": timestamp(started), "target_address": "10.0.0.2", **body}))


def spawn_real_worker(barman_files, op_id):
    pg = pg_store(barman_files)
    pg.ensure_dirs()  # as accepting the operation does
    runner.spawn_worker(OperationType.RECOVERY, "pg", op_id, pg, str(barman_files.conf))


def wait_worker_gone(barman_files, op_id):
    path = worker_file(barman_files, op_id)
    wait_for(path.exists)
    ident = processes.ProcessIdentity.from_json(json.loads(path.read_text()))
    wait_for(lambda: not processes.is_alive(ident))


def run_doctor(fix=False):
    code = cli.main(["doctor", *(["--fix"] if fix else [])])
    return code


# -- the real worker with a stand-in barman ------------------------------------------------------

def test_the_real_worker_runs_barman_and_records_success(client, fake_barman):
    op_id = start(client)
    doc = ended(client, op_id)
    assert (doc["status"], doc["state"], doc["exit_code"]) == ("DONE", "succeeded", 0)
    assert "Restore operation completed" in doc["output"]
    (started,) = fake_barman.starts()
    assert started.endswith(f"-- pg 20261127T010000 {BODY['destination_directory']}")


def test_a_failing_barman_is_failed_with_its_exit_code(client, fake_barman):
    fake_barman.mode("fail")
    doc = ended(client, start(client))
    assert (doc["status"], doc["state"], doc["exit_code"]) == ("FAILED", "failed", 2)
    assert doc["reason"] == "barman exited with code 2: Cannot connect to remote host"  # Barman's ERROR line
    assert "Cannot connect to remote host" in doc["output"]


def test_a_barman_that_prints_a_lot_loses_no_line(client, fake_barman):
    fake_barman.mode("flood")
    op_id = start(client)
    doc = ended(client, op_id)
    assert doc["status"] == "DONE"
    lines = client.get(f"/servers/pg/operations/{op_id}/output").get_data(as_text=True).splitlines()
    # The worker's own first line says how ssh was set up; every line after it is barman's.
    assert lines[0].startswith("pg-backup-api: ssh ")
    assert lines[1:] == [f"line {i}: copying a file of the base backup" for i in range(50000)]


def test_cancel_returns_as_soon_as_the_group_is_empty(client, fake_barman, barman_files):
    fake_barman.mode("sleep")
    op_id = start(client)
    wait_for(lambda: status(client, op_id)["phase"] == "copying base backup")
    started = time.monotonic()
    response = client.post(f"/servers/pg/operations/{op_id}/cancel")
    assert time.monotonic() - started < 1.5
    assert (response.status_code, response.json["state"]) == (200, "canceled")


def test_cancel_of_a_barman_ignoring_sigterm_needs_no_wait_after_sigkill(client, fake_barman, barman_files):
    fake_barman.mode("stubborn")
    op_id = start(client)
    wait_for(lambda: "started" in client.get(f"/servers/pg/operations/{op_id}/output").get_data(as_text=True))
    pid = json.loads(worker_file(barman_files, op_id).read_text())["pid"]
    started = time.monotonic()
    response = client.post(f"/servers/pg/operations/{op_id}/cancel")
    # cancel_grace is 0.5 s; the group is gone right after the SIGKILL, and nothing waits 5 s more.
    assert time.monotonic() - started < 2.5
    assert (response.status_code, response.json["state"]) == (200, "canceled")
    assert processes.group_members(pid) == []


def test_processes_surviving_sigkill_make_cancel_failed_and_keep_the_claim(client, fake_barman, barman_files,
                                                                          monkeypatch):
    fake_barman.mode("sleep")
    op_id = start(client)
    wait_for(fake_barman.starts)  # barman runs: the cancel below must stop it, not prevent its start
    # A process in uninterruptible sleep survives SIGKILL; making one takes root and a cgroup v1
    # freezer (tests/e2e/test_lifecycle.py does it), so here the stop reports what it would: failure.
    monkeypatch.setattr(processes, "stop_group", lambda pgid, marker, grace: False)
    response = client.post(f"/servers/pg/operations/{op_id}/cancel")
    assert response.status_code == 500
    assert "survived SIGKILL" in response.json["error"] and "stays claimed" in response.json["error"]
    doc = status(client, op_id)
    assert (doc["status"], doc["state"]) == ("IN_PROGRESS", "cancel_failed")
    assert "survived SIGKILL" in doc["reason"]
    assert client.post("/servers/pg/operations", json=BODY).status_code == 409
    monkeypatch.undo()
    # Once they can be stopped, a cancel ends it.
    again = client.post(f"/servers/pg/operations/{op_id}/cancel")
    assert (again.status_code, again.json["state"]) == (200, "canceled")


def test_after_a_plain_signal_the_end_waits_for_what_barman_left_running(client, fake_barman, barman_files):
    """A process of the operation still running means the operation has not ended: its destination
    stays claimed. Here barman leaves a child ignoring SIGTERM behind when the worker is killed."""
    fake_barman.mode("straggler")
    op_id = start(client)
    wait_for(fake_barman.starts)
    straggler_file = Path(f"{fake_barman.starts_file}.straggler")
    straggler = int(wait_for(lambda: straggler_file.exists() and straggler_file.read_text().strip()))
    path = worker_file(barman_files, op_id)
    worker = json.loads(wait_for(lambda: path.exists() and path.read_text()))["pid"]
    os.kill(worker, signal.SIGTERM)  # not a cancel: only the worker is signalled, and it signals barman
    output = barman_files.home / "pg" / "output" / f"{op_id}.json"
    seen_while_running = []
    while straggler in processes.group_members(worker):
        seen_while_running.append(output.exists())
        time.sleep(0.05)
    assert seen_while_running and not any(seen_while_running)
    doc = ended(client, op_id)
    assert (doc["status"], doc["reason"]) == ("FAILED", "the worker received signal SIGTERM")


# -- a worker never starts barman after its operation has ended ------------------------------------

def test_a_worker_starting_after_its_operation_was_declared_lost_starts_no_barman(client, fake_barman,
                                                                                 barman_files):
    op_id = "20261127T010101"
    write_job(barman_files, op_id, now_utc() - timedelta(minutes=5))
    assert status(client, op_id)["state"] == "lost"
    spawn_real_worker(barman_files, op_id)  # the slow worker finally runs
    wait_worker_gone(barman_files, op_id)
    assert fake_barman.starts() == []
    doc = status(client, op_id)
    assert (doc["state"], doc["reason"]) == ("lost", "the worker did not start within 60 s")
    log = (barman_files.home / "pg" / "jobs" / ".workers" / f"{op_id}.log").read_text()
    assert "barman not started: the operation had already ended (state lost" in log


def test_a_worker_starting_after_its_operation_was_canceled_starts_no_barman(client, fake_barman, barman_files):
    op_id = "20261127T010101"
    write_job(barman_files, op_id, now_utc())
    response = client.post(f"/servers/pg/operations/{op_id}/cancel")
    assert (response.status_code, response.json["state"]) == (200, "canceled")
    spawn_real_worker(barman_files, op_id)
    wait_worker_gone(barman_files, op_id)
    assert fake_barman.starts() == []
    assert status(client, op_id)["state"] == "canceled"


def test_a_sigterm_before_barman_starts_prevents_the_start(client, fake_barman, barman_files):
    op_id = "20261127T010101"
    write_job(barman_files, op_id, now_utc())
    # Holding the operation's lock stops the worker right before its decision to start barman.
    with open(barman_files.home / "pg" / "jobs" / f"{op_id}.json") as job:
        fcntl.flock(job, fcntl.LOCK_EX)
        spawn_real_worker(barman_files, op_id)
        wait_for(worker_file(barman_files, op_id).exists)
        os.kill(json.loads(worker_file(barman_files, op_id).read_text())["pid"], signal.SIGTERM)
    doc = ended(client, op_id)
    assert (doc["status"], doc["state"]) == ("FAILED", "failed")
    assert doc["reason"] == "the worker received signal SIGTERM"
    assert "barman not started: the worker received SIGTERM before barman started" in doc["output"]
    assert fake_barman.starts() == []


def test_a_lost_verdict_waits_for_a_worker_deciding_under_the_lock(client, fake_barman, barman_files,
                                                                    monkeypatch):
    """The service's verdict and the worker's decision are serialised: the second sees the first."""
    op_id = "20261127T010101"
    write_job(barman_files, op_id, now_utc() - timedelta(minutes=5))
    with open(barman_files.home / "pg" / "jobs" / f"{op_id}.json") as job:
        fcntl.flock(job, fcntl.LOCK_EX)
        spawn_real_worker(barman_files, op_id)
        wait_for(worker_file(barman_files, op_id).exists)  # it has recorded itself and waits for the lock
        fake_barman.mode("sleep")
    # The worker is alive and recorded: not lost, whatever the grace says; it goes on to start barman.
    assert status(client, op_id)["state"] == "running"
    wait_for(fake_barman.starts)
    client.post(f"/servers/pg/operations/{op_id}/cancel")


# -- the service dies between the job file and the worker -------------------------------------------

def test_a_service_killed_before_spawning_leaves_an_operation_that_is_reported_not_stuck(
        client, fake_barman, barman_files, monkeypatch):
    script = textwrap.dedent(f"""
        import os, signal
        from pg_backup_api.service.use_cases import Service
        from pg_backup_api.rules.settings import Settings
        from tests.conftest import FakeTarget
        def die(*args):
            os.kill(os.getpid(), signal.SIGKILL)  # after the job file and the claim, before the worker
        Service(Settings(barman_conf={str(barman_files.conf)!r}), spawn=die,
                probe=FakeTarget()).create_operation("pg", {BODY!r})
    """)
    killed = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -signal.SIGKILL
    (op_id,) = [o["id"] for o in client.get("/servers/pg/operations").json["operations"]]
    assert status(client, op_id)["state"] == "running"  # within the grace the worker may still come
    assert client.post("/servers/pg/operations", json=BODY).status_code == 409
    monkeypatch.setattr(service, "WORKER_START_GRACE", timedelta(0))
    doc = status(client, op_id)
    assert (doc["status"], doc["state"]) == ("FAILED", "lost")
    assert "did not start" in doc["reason"]
    assert client.post("/servers/pg/operations", json=BODY).status_code == 202


# -- state files fail closed ------------------------------------------------------------------------

def two_operations(client, fake_barman):
    """An ended operation into /srv/pg/restore and a running one into /srv/pg/other."""
    done = start(client)
    ended(client, done)
    fake_barman.mode("sleep")
    running = start(client, {**BODY, "destination_directory": "/srv/pg/other"})
    wait_for(lambda: status(client, running)["phase"] == "copying base backup")
    return done, running


def test_a_job_file_truncated_to_zero_bytes_is_corrupt_alone_and_holds_its_destination(
        client, fake_barman, barman_files, capsys):
    done, running = two_operations(client, fake_barman)
    wait_worker_gone(barman_files, done)  # its end is recorded a moment before its worker exits
    job = barman_files.home / "pg" / "jobs" / f"{done}.json"
    job.write_text("")
    listing = client.get("/servers/pg/operations")
    assert listing.status_code == 200
    assert {"id": done, "type": "unknown", "state": "corrupt"} in listing.json["operations"]
    doc = status(client, done)
    assert (doc["status"], doc["state"], doc["corrupt_file"]) == ("FAILED", "corrupt", str(job))
    assert "cannot be read" in doc["reason"] and "doctor" in doc["reason"]
    assert status(client, running)["state"] == "running"
    assert client.get("/servers/pg/operations?status=FAILED").status_code == 200
    blocked = client.post("/servers/pg/operations", json=BODY)
    assert blocked.status_code == 409 and "doctor" in blocked.json["error"]
    assert run_doctor() == 1
    assert f"FAIL state-files: {job} cannot be read" in capsys.readouterr().out
    assert run_doctor(fix=True) == 0
    assert not job.exists()
    assert list((barman_files.home / "jobs" / "quarantine" / "pg").glob(f"{done}.json.*"))
    start(client)  # the destination is free once the operator has acted
    client.post(f"/servers/pg/operations/{running}/cancel")


@pytest.mark.parametrize("garbage", ["\x00\x01 not json", '{"pid": "x"}', "[1, 2]"])
def test_a_worker_file_with_garbage_is_corrupt_not_lost(client, fake_barman, barman_files, capsys, garbage):
    done, running = two_operations(client, fake_barman)
    worker = worker_file(barman_files, running)
    pid = json.loads(worker.read_text())["pid"]
    worker.write_text(garbage)
    doc = status(client, running)
    assert (doc["status"], doc["state"], doc["corrupt_file"]) == ("FAILED", "corrupt", str(worker))
    assert processes.group_members(pid) != []  # not declared lost, so nothing was stopped
    assert client.get("/servers/pg/operations").status_code == 200
    assert status(client, done)["state"] == "succeeded"
    assert client.post("/servers/pg/operations", json={**BODY, "destination_directory": "/srv/pg/other"}
                       ).status_code == 409
    assert client.post(f"/servers/pg/operations/{running}/cancel").status_code == 409
    # The operator is told, and --fix leaves the file while the operation's processes run.
    assert run_doctor(fix=True) == 1
    assert "not moved: processes" in capsys.readouterr().out
    assert worker.exists()
    for member in processes.marked(runner.operation_marker("pg", running)):
        os.kill(member, signal.SIGKILL)
    wait_for(lambda: processes.marked(runner.operation_marker("pg", running)) == [])
    assert run_doctor(fix=True) == 0
    assert not worker.exists()


def test_an_output_file_with_garbage_is_corrupt_and_the_rest_stays_readable(client, fake_barman, barman_files):
    done, running = two_operations(client, fake_barman)
    output = barman_files.home / "pg" / "output" / f"{done}.json"
    output.write_text('{"success": tru')
    assert status(client, done)["state"] == "corrupt"
    assert [o["id"] for o in client.get("/servers/pg/operations?status=FAILED").json["operations"]] == [done]
    assert client.get(f"/servers/pg/operations/{done}/output").status_code == 200
    assert status(client, running)["state"] == "running"
    client.post(f"/servers/pg/operations/{running}/cancel")


def test_an_unreadable_claim_blocks_its_destination(client, fake_barman, barman_files):
    done = start(client)
    ended(client, done)
    (claim,) = (barman_files.home / "jobs" / ".destinations").glob("*.claim")
    claim.write_text("{")
    blocked = client.post("/servers/pg/operations", json=BODY)
    assert blocked.status_code == 409
    assert str(claim) in blocked.json["error"]
    assert client.post("/servers/pg/operations", json={**BODY, "destination_directory": "/srv/x"}
                       ).status_code == 202


def corrupt_operation(barman_files, op_id, which):
    """An operation started just now (no worker yet) whose *which* file (job, worker, output) holds garbage."""
    write_job(barman_files, op_id, now_utc())
    path = {"job": barman_files.home / "pg" / "jobs" / f"{op_id}.json", "worker": worker_file(barman_files, op_id),
            "output": barman_files.home / "pg" / "output" / f"{op_id}.json"}[which]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"garbage": ')
    return path


def listed_ids(client, query):
    response = client.get(f"/servers/pg/operations?{query}")
    assert response.status_code == 200, response.json
    return [op["id"] for op in response.json["operations"]]


@pytest.mark.parametrize("which", ["job", "worker", "output"])
def test_a_corrupt_operation_is_failed_in_the_lists_filters_as_its_status_says(client, barman_files, which):
    corrupt_operation(barman_files, "20261127T010101", which)
    write_job(barman_files, "20261127T010102", now_utc())  # a healthy one, running
    doc = status(client, "20261127T010101")
    assert (doc["status"], doc["state"]) == ("FAILED", "corrupt")
    assert listed_ids(client, "status=IN_PROGRESS") == ["20261127T010102"]
    assert listed_ids(client, "status=FAILED") == ["20261127T010101"]
    assert listed_ids(client, "status=DONE") == []


@pytest.mark.parametrize("start_time", ["yesterday", "2026-11-27 25:61:00", 1764205261, None, "missing"])
def test_a_job_whose_start_time_does_not_parse_is_corrupt_not_running_for_ever(client, barman_files, capsys,
                                                                             start_time):
    jobs = barman_files.home / "pg" / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    job = jobs / "20261127T010101.json"
    fields = {"operation_type": "recovery", **BODY}
    if start_time != "missing":
        fields["start_time"] = start_time
    job.write_text(json.dumps(fields))
    doc = status(client, "20261127T010101")
    assert (doc["status"], doc["state"], doc["corrupt_file"]) == ("FAILED", "corrupt", str(job))
    assert "field 'start_time'" in doc["reason"]
    assert listed_ids(client, "status=IN_PROGRESS") == []
    assert listed_ids(client, "status=FAILED") == ["20261127T010101"]
    assert client.post("/servers/pg/operations/20261127T010101/cancel").status_code == 409
    assert run_doctor() == 1
    out = capsys.readouterr().out
    assert f"FAIL state-files: {job} cannot be read (field 'start_time'" in out
    assert run_doctor(fix=True) == 0
    assert not job.exists()


# -- reconciliation never stops early --------------------------------------------------------------

def test_start_up_reconciliation_goes_on_past_a_server_it_cannot_read(barman_files, fake_barman, caplog):
    barman_files.add_server("pg2")
    (barman_files.home / "pg").mkdir(exist_ok=True)
    (barman_files.home / "pg" / "jobs").write_text("not a directory")
    jobs = barman_files.home / "pg2" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "20261127T010101.json").write_text(json.dumps(
        {"operation_type": "recovery", "start_time": timestamp(now_utc() - timedelta(minutes=5)), **BODY}))
    (jobs / "20261127T010102.json").write_text("")
    svc = service.Service(Settings(barman_conf=str(barman_files.conf)))
    assert svc.reconcile_all() == 1
    assert svc.reconcile_errors == 1
    assert "cannot list the operations of pg" in caplog.text
    assert json.loads((barman_files.home / "pg2" / "output" / "20261127T010101.json").read_text())["state"] == "lost"


def test_prune_during_100_lists_never_fails_a_list(client, barman_files):
    jobs, outputs = barman_files.home / "pg" / "jobs", barman_files.home / "pg" / "output"
    jobs.mkdir(parents=True)
    outputs.mkdir()
    long_ago = timestamp(now_utc() - timedelta(days=60))
    ids = [f"20261001T0000{i:02d}" for i in range(60)]
    for op_id in ids:
        job = {"operation_type": "recovery", "start_time": long_ago, **BODY}
        (jobs / f"{op_id}.json").write_text(json.dumps(job))
        (outputs / f"{op_id}.json").write_text(json.dumps({**job, "success": True, "end_time": long_ago,
                                                           "state": "succeeded"}))
    svc = service.Service(Settings(barman_conf=str(barman_files.conf)))
    pruning = threading.Thread(target=lambda: svc.prune(timedelta(days=30), dry_run=False))
    pruning.start()
    answers = [client.get("/servers/pg/operations") for _ in range(100)]
    pruning.join()
    assert [a.status_code for a in answers] == [200] * 100
    assert all({o["id"] for o in a.json["operations"]} <= set(ids) for a in answers)
    assert client.get("/servers/pg/operations").json["operations"] == []


# -- Barman's home cannot be written -----------------------------------------------------------------

@pytest.mark.parametrize("code, status_code", [(errno.ENOSPC, 507), (errno.EDQUOT, 507), (errno.EROFS, 503)])
def test_a_full_or_read_only_home_refuses_the_post_and_stores_nothing(client, fake_barman, barman_files,
                                                                     monkeypatch, code, status_code):
    done = start(client)
    before = status(client, ended(client, done)["operation_id"])

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(store.os, "fsync", failing_fsync)
    response = client.post("/servers/pg/operations", json={**BODY, "destination_directory": "/srv/pg/new"})
    monkeypatch.undo()
    assert response.status_code == status_code
    assert "nothing was stored" in response.json["error"]
    names = sorted(os.listdir(barman_files.home / "pg" / "jobs"))
    assert names == [".workers", f"{done}.json"]  # no job file, whole or half-written, no temporary file
    assert status(client, done) == before


# -- Barman's configuration broken, then fixed -------------------------------------------------------

def test_a_configuration_broken_then_fixed_answers_503_then_heals_without_a_restart(client, barman_files):
    assert client.get("/servers/pg/operations").status_code == 200
    bad = barman_files.conf_dir / "zz-bad.conf"
    bad.write_text("[barman]\nbarman_home = /elsewhere\n")
    broken = client.get("/servers/pg/operations")
    assert broken.status_code == 503
    assert "invalid" in broken.json["error"]
    bad.unlink()
    assert client.get("/servers/pg/operations").status_code == 200
