"""Operation lifecycle with real processes: the worker code runs a stand-in for barman."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest

from pg_backup_api import create_app
from pg_backup_api.core.model import now_utc, timestamp
from pg_backup_api.rules.settings import Settings
from pg_backup_api.worker import processes
from pg_backup_api.worker.runner import operation_marker

from .conftest import wait_for

BODY = {"type": "recovery", "backup_id": "latest", "destination_directory": "/srv/pg/restore",
        "remote_ssh_command": "ssh postgres@db2"}

# Stands in for `barman restore`: prints the phases barman prints, then works for a while.
FAKE_BARMAN = ["sh", "-c", "echo 'Starting remote restore for server pg'; echo 'Copying the base backup.'; "
                           "sleep 60 & wait"]


class RealWorkerSpawn:
    """Starts the real worker class, detached as in production, with *argv* in place of barman."""

    def __init__(self, argv):
        self.argv = argv

    def __call__(self, op_type, server, op_id, store, barman_conf):
        script = textwrap.dedent(f"""
            from pathlib import Path
            from pg_backup_api.worker.runner import Worker, finish
            from pg_backup_api.store.jobs import OperationStore
            store = OperationStore(Path({str(store.root)!r}), {server!r})
            worker = Worker(store, {server!r}, {op_id!r})
            code, out = worker.run({self.argv!r})
            finish(store, {op_id!r}, store.get({op_id!r}).job, code, out, *worker.end_state(code, out))
        """)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
               processes.MARKER_VARIABLE: operation_marker(server, op_id)}
        with open(store.log_path(op_id), "ab") as log:
            subprocess.run(["setsid", "--fork", sys.executable, "-c", script], stdin=subprocess.DEVNULL,
                           stdout=log, stderr=subprocess.STDOUT, env=env, check=True)


@pytest.fixture
def make_client(barman_files):
    barman_files.add_backup("20261127T010000")

    def make(argv=FAKE_BARMAN, grace=2.0):
        app = create_app(Settings(barman_conf=str(barman_files.conf), cancel_grace=grace),
                         spawn=RealWorkerSpawn(argv))
        return app.test_client()
    return make


def start(client, body=BODY):
    response = client.post("/servers/pg/operations", json=body)
    assert response.status_code == 202, response.json
    return response.json["operation_id"]


def status(client, op_id):
    return client.get(f"/servers/pg/operations/{op_id}").json


def worker_pid(barman_files, op_id):
    path = barman_files.home / "pg" / "jobs" / ".workers" / f"{op_id}.worker"
    wait_for(path.exists)
    return json.loads(path.read_text())["pid"]


def test_a_running_operation_shows_its_phase_and_output_so_far(make_client, barman_files):
    client = make_client()
    op_id = start(client)
    doc = wait_for(lambda: (d := status(client, op_id))["phase"] == "copying base backup" and d)
    assert doc["status"] == "IN_PROGRESS"
    assert doc["state"] == "running"
    assert doc["output_tail"][-1] == "Copying the base backup."
    assert doc["duration_s"] >= 0
    output = client.get(f"/servers/pg/operations/{op_id}/output")
    assert output.mimetype == "text/plain"
    assert "Copying the base backup." in output.get_data(as_text=True)
    client.post(f"/servers/pg/operations/{op_id}/cancel")


def test_a_worker_killed_with_sigkill_is_failed_lost_on_the_next_read(make_client, barman_files):
    client = make_client()
    op_id = start(client)
    pid = worker_pid(barman_files, op_id)
    os.kill(pid, signal.SIGKILL)
    doc = wait_for(lambda: (d := status(client, op_id))["status"] != "IN_PROGRESS" and d)
    assert doc["status"] == "FAILED"
    assert doc["state"] == "lost"
    assert f"pid {pid}" in doc["reason"]
    # The verdict is written down, and what the worker started is stopped.
    output = json.loads((barman_files.home / "pg" / "output" / f"{op_id}.json").read_text())
    assert output["state"] == "lost"
    wait_for(lambda: processes.group_members(pid) == [])


def test_a_worker_that_never_started_is_lost_after_the_grace(make_client, barman_files):
    client = make_client()
    jobs = barman_files.home / "pg" / "jobs"
    jobs.mkdir(parents=True)
    long_ago = timestamp(now_utc() - timedelta(minutes=5))
    (jobs / "20261127T010101.json").write_text(json.dumps(
        {"operation_type": "recovery", "start_time": long_ago, **BODY}))
    doc = status(client, "20261127T010101")
    assert (doc["status"], doc["state"]) == ("FAILED", "lost")
    assert "did not start" in doc["reason"]


def test_the_list_reconciles_too(make_client, barman_files):
    client = make_client()
    op_id = start(client)
    os.kill(worker_pid(barman_files, op_id), signal.SIGKILL)
    time.sleep(0.2)
    client.get("/servers/pg/operations")
    assert (barman_files.home / "pg" / "output" / f"{op_id}.json").exists()


def test_cancel_stops_the_whole_process_group(make_client, barman_files):
    client = make_client()
    op_id = start(client)
    pid = worker_pid(barman_files, op_id)
    wait_for(lambda: len(processes.group_members(pid)) >= 3)  # worker, sh, sleep
    response = client.post(f"/servers/pg/operations/{op_id}/cancel")
    assert response.status_code == 200
    assert (response.json["status"], response.json["state"]) == ("FAILED", "canceled")
    assert processes.group_members(pid) == []
    assert status(client, op_id)["state"] == "canceled"


def test_cancel_escalates_to_sigkill_when_sigterm_is_ignored(make_client, barman_files):
    stubborn = ["sh", "-c", "trap '' TERM; echo started; while :; do sleep 0.1; done"]
    client = make_client(argv=stubborn, grace=0.5)
    op_id = start(client)
    pid = worker_pid(barman_files, op_id)
    wait_for(lambda: "started" in client.get(f"/servers/pg/operations/{op_id}/output").get_data(as_text=True))
    response = client.post(f"/servers/pg/operations/{op_id}/cancel")
    assert response.json["state"] == "canceled"
    assert processes.group_members(pid) == []


def test_cancelling_an_ended_operation_is_409_and_an_unknown_one_404(make_client):
    client = make_client(argv=["true"])
    op_id = start(client)
    wait_for(lambda: status(client, op_id)["status"] == "DONE")
    response = client.post(f"/servers/pg/operations/{op_id}/cancel")
    assert response.status_code == 409
    assert "already ended" in response.json["error"]
    assert client.post("/servers/pg/operations/20000101T000000/cancel").status_code == 404


def test_a_destination_is_free_again_once_its_recovery_has_ended(make_client):
    client = make_client(argv=["false"])
    op_id = start(client)
    wait_for(lambda: status(client, op_id)["status"] == "FAILED")
    assert status(client, op_id)["state"] == "failed"
    assert status(client, op_id)["exit_code"] == 1
    start(client)


def test_no_zombie_is_left_after_many_operations(make_client):
    client = make_client(argv=["true"])
    ids = [start(client, {**BODY, "destination_directory": f"/srv/pg/r{i}"}) for i in range(20)]
    for op_id in ids:
        wait_for(lambda op_id=op_id: status(client, op_id)["status"] == "DONE")
    zombies = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(os.getpid())],
                             capture_output=True, text=True).stdout
    assert "Z" not in zombies


def test_list_filters_and_pages(make_client):
    client = make_client(argv=["true"])
    ids = [start(client, {**BODY, "destination_directory": f"/srv/pg/r{i}"}) for i in range(5)]
    for op_id in ids:
        wait_for(lambda op_id=op_id: status(client, op_id)["status"] == "DONE")
    page = client.get("/servers/pg/operations?limit=2").json
    assert [o["id"] for o in page["operations"]] == ids[:2]
    assert page["next"] == ids[1]
    rest = client.get(f"/servers/pg/operations?limit=10&after={page['next']}").json
    assert [o["id"] for o in rest["operations"]] == ids[2:]
    assert "next" not in rest
    assert len(client.get("/servers/pg/operations?status=DONE&type=recovery").json["operations"]) == 5
    assert client.get("/servers/pg/operations?status=FAILED").json["operations"] == []
    for bad in ["status=WHATEVER", "limit=0", "limit=x", "colour=red"]:
        response = client.get(f"/servers/pg/operations?{bad}")
        assert response.status_code == 400
        assert "error" in response.json
