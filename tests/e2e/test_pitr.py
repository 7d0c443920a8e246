"""Point-in-time recovery through the API: the restored cluster stops exactly at the target."""

from __future__ import annotations

import subprocess
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from .conftest import VENV, wait_for

pytestmark = pytest.mark.e2e


def archive_current_wal(sandbox) -> None:
    """`barman switch-wal --archive`, with commits meanwhile so pg_receivewal closes the segment soon."""
    done = threading.Event()

    def tick():
        while not done.wait(0.5):
            sandbox.psql(int(sandbox["PGPORT"]), "SELECT txid_current()")

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        subprocess.run(["runuser", "-u", sandbox["BARMAN_USER"], "--", str(VENV / "bin" / "barman"),
                        "-c", sandbox["BARMAN_CONF"], "switch-wal", "--force", "--archive",
                        "--archive-timeout", "60", sandbox["BARMAN_SERVER"]],
                       check=True, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    finally:
        done.set()
        ticker.join()


def recover_promoted(sandbox, service, destination: str, **target) -> dict:
    """POST a recovery with *target* and target_action promote; its final status once it has ended."""
    server = sandbox["BARMAN_SERVER"]
    response = service.post(f"/servers/{server}/operations", json={
        "type": "recovery", "destination_directory": destination, "remote_ssh_command": sandbox["SSH_COMMAND"],
        "target_action": "promote", **target})
    assert response.status_code == 202, response.text
    status = service.wait_until_ended(server, response.json()["operation_id"])
    assert status["status"] == "DONE", status.get("output")
    return status


@contextmanager
def promoted_copy(sandbox, destination: str) -> Iterator[int]:
    """The restored cluster started, once it has reached its target and left recovery; its port."""
    with sandbox.copy(destination) as port:
        # With target_action promote the cluster leaves recovery by itself, after its start.
        wait_for(lambda: sandbox.psql(port, "SELECT pg_is_in_recovery()") == "f", timeout=60,
                 interval=0.5, what="promotion of the restored cluster")
        yield port


def test_recovery_to_a_target_time_keeps_what_came_before_and_nothing_after(sandbox, service):
    port = int(sandbox["PGPORT"])
    sandbox.psql(port, "CREATE TABLE pitr_rows (id int PRIMARY KEY, label text NOT NULL)")
    sandbox.psql(port, "INSERT INTO pitr_rows SELECT g, 'before-' || g FROM generate_series(1, 10) g")
    target = sandbox.psql(port, "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')")
    time.sleep(1)
    sandbox.psql(port, "INSERT INTO pitr_rows SELECT g, 'after-' || g FROM generate_series(11, 20) g")
    archive_current_wal(sandbox)

    status = recover_promoted(sandbox, service, sandbox.restore_dir("e2e-pitr"), backup_id="auto",
                              target_time=target)
    assert status["target_time"] == target
    # `auto` picks the newest backup that ended before the target (other tests may add backups).
    backups = service.get(f"/servers/{sandbox['BARMAN_SERVER']}/backups").json()["backups"]
    ended_before = [b["backup_id"] for b in backups if b["status"] == "DONE" and b["end_time"] < target]
    assert status["resolved_backup_id"] == ended_before[-1]
    with promoted_copy(sandbox, status["destination_directory"]) as copy_port:
        assert sandbox.psql(copy_port, "SELECT count(*), min(label), max(id) FROM pitr_rows") == "10|before-1|10"


def test_a_target_time_before_the_backup_is_refused_at_post_time(sandbox, service):
    response = service.post(f"/servers/{sandbox['BARMAN_SERVER']}/operations", json={
        "type": "recovery", "backup_id": "latest", "destination_directory": sandbox.restore_dir("e2e-early"),
        "remote_ssh_command": sandbox["SSH_COMMAND"], "target_time": "2000-01-01T00:00:00+00:00"})
    assert response.status_code == 422
    assert "before the end of backup" in response.json()["error"]


def rows_around_a_restore_point(sandbox, table: str, point: str, before: int, after: int) -> None:
    """Table *table* with rows 1..*before*, the restore point *point*, then rows up to *after*, archived."""
    port = int(sandbox["PGPORT"])
    sandbox.psql(port, f"CREATE TABLE {table} (id int PRIMARY KEY)")
    sandbox.psql(port, f"INSERT INTO {table} SELECT generate_series(1, {before})")
    sandbox.psql(port, f"SELECT pg_create_restore_point('{point}')")
    sandbox.psql(port, f"INSERT INTO {table} SELECT generate_series({before + 1}, {after})")
    archive_current_wal(sandbox)


def test_recovery_to_a_named_restore_point(sandbox, service):
    rows_around_a_restore_point(sandbox, "named_rows", "before_the_mistake", 5, 9)

    status = recover_promoted(sandbox, service, sandbox.restore_dir("e2e-pitr-name"), backup_id="latest",
                              target_name="before_the_mistake")
    with promoted_copy(sandbox, status["destination_directory"]) as copy_port:
        assert sandbox.psql(copy_port, "SELECT count(*), max(id) FROM named_rows") == "5|5"
