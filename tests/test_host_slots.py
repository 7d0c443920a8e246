"""At most max_recoveries_per_host recoveries run at once into one host; the others wait, queued, in order.

These run the real `spawn_worker` and worker (detached processes) with a stand-in barman that
holds each recovery until the test opens its gate.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from functools import partial
from pathlib import Path

import pytest

from pg_backup_api import create_app
from pg_backup_api.rules.settings import Settings
from pg_backup_api.store import claims
from pg_backup_api.worker import processes

from .conftest import install_stand_in_barman, operation_ended, operation_status, wait_for

BODY = {"type": "recovery", "backup_id": "latest", "remote_ssh_command": "ssh postgres@10.0.0.2"}

# Notes its start, then copies until the gate named after its destination directory is opened.
GATED_BARMAN = textwrap.dedent("""\
    #!/bin/sh
    for last; do :; done
    echo "$$ $last" >> "$FAKE_BARMAN_STARTS"
    echo "Starting remote restore for server pg"
    echo "Copying the base backup."
    while [ ! -e "$FAKE_GATE/$(basename "$last")" ]; do sleep 0.05; done
    echo "Restore operation completed"
    """)


class Gated:
    def __init__(self, tmp_path: Path) -> None:
        self.starts_file = tmp_path / "barman-starts"
        self.gates = tmp_path / "gates"
        self.gates.mkdir()

    def started(self) -> list:
        """The destinations barman was started for, in order."""
        lines = self.starts_file.read_text().splitlines() if self.starts_file.exists() else []
        return [line.split(" ", 1)[1] for line in lines]

    def open(self, destination: str) -> None:
        (self.gates / Path(destination).name).touch()


@pytest.fixture
def gated(tmp_path, monkeypatch, barman_files) -> Gated:
    # What the detached workers read: a limit of 2 per host.
    install_stand_in_barman(tmp_path, monkeypatch, barman_files, GATED_BARMAN,
                            "[api]\nmax_recoveries_per_host = 2\n")
    fake = Gated(tmp_path)
    monkeypatch.setenv("FAKE_BARMAN_STARTS", str(fake.starts_file))
    monkeypatch.setenv("FAKE_GATE", str(fake.gates))
    yield fake
    for gate in "abcdefghij":
        fake.open(f"/srv/pg/{gate}")  # let every worker end


@pytest.fixture
def client(barman_files, gated):
    return create_app(Settings(barman_conf=str(barman_files.conf), cancel_grace=0.5)).test_client()


wait_for = partial(wait_for, timeout=30)


status = operation_status
ended = partial(operation_ended, timeout=30)


def post_four(client, gated) -> list:
    """Recoveries into /srv/pg/a, b, c and d of one host, in that order: a and b run, c and d wait."""
    ids = []
    for destination in ("a", "b", "c", "d"):
        body = {**BODY, "destination_directory": f"/srv/pg/{destination}"}
        response = client.post("/servers/pg/operations", json=body)
        assert response.status_code == 202, response.json
        ids.append(response.json["operation_id"])
        # One at a time, so each place is known (arrival order is the order of the operation ids).
        if destination in ("a", "b"):
            wait_for(lambda: len(gated.started()) == len(ids))
        else:
            wait_for(lambda: status(client, ids[-1])["state"] == "queued")
    return ids


def test_beyond_the_limit_recoveries_wait_queued_in_arrival_order(client, gated):
    a, b, c, d = post_four(client, gated)
    time.sleep(1)  # the waiting ones keep waiting
    assert gated.started() == ["/srv/pg/a", "/srv/pg/b"]
    for op_id in (a, b):
        assert (status(client, op_id)["status"], status(client, op_id)["state"]) == ("IN_PROGRESS", "running")
    for op_id, place in ((c, 1), (d, 2)):
        doc = status(client, op_id)
        assert (doc["status"], doc["state"]) == ("IN_PROGRESS", "queued")
        assert doc["phase"] == "waiting for a slot on 10.0.0.2"
        assert doc["output_tail"][-1] == (f"pg-backup-api: waiting for a slot on 10.0.0.2 (2 recoveries run there, at "
                                          f"most 2 at once: max_recoveries_per_host); number {place} in the queue")
    listed = client.get("/servers/pg/operations?status=IN_PROGRESS").json["operations"]
    assert [o["id"] for o in listed] == [a, b, c, d]


def test_an_ended_recovery_hands_its_slot_to_the_first_in_the_queue(client, gated):
    a, b, c, d = post_four(client, gated)
    gated.open("/srv/pg/b")
    assert ended(client, b)["status"] == "DONE"
    wait_for(lambda: len(gated.started()) == 3)
    assert gated.started() == ["/srv/pg/a", "/srv/pg/b", "/srv/pg/c"]
    assert status(client, c)["state"] == "running"
    assert status(client, d)["state"] == "queued"
    gated.open("/srv/pg/c")
    wait_for(lambda: len(gated.started()) == 4)
    gated.open("/srv/pg/a")
    gated.open("/srv/pg/d")
    for op_id in (a, d):
        assert ended(client, op_id)["status"] == "DONE"
    # The wait is part of the operation's output.
    output = status(client, d)["output"]
    assert "pg-backup-api: waiting for a slot on 10.0.0.2 (" in output
    assert "pg-backup-api: got a slot on 10.0.0.2 after " in output


def test_a_queued_recovery_can_be_canceled_and_never_starts(client, gated):
    a, b, c, d = post_four(client, gated)
    response = client.post(f"/servers/pg/operations/{c}/cancel")
    assert (response.status_code, response.json["status"], response.json["state"]) == (200, "FAILED", "canceled")
    assert "barman not started" in response.json["output"]
    gated.open("/srv/pg/a")
    wait_for(lambda: len(gated.started()) == 3)
    assert gated.started() == ["/srv/pg/a", "/srv/pg/b", "/srv/pg/d"]  # c's turn went to d
    assert status(client, c)["state"] == "canceled"


def test_the_slot_of_a_worker_killed_while_it_ran_is_taken_by_the_next(client, gated, barman_files):
    a, b, c, d = post_four(client, gated)
    worker = json.loads((barman_files.home / "pg" / "jobs" / ".workers" / f"{a}.worker").read_text())
    os.kill(worker["pid"], signal.SIGKILL)
    # The next waiter asks for a slot, finds a's worker gone: a is lost, its barman stopped, c starts.
    wait_for(lambda: len(gated.started()) == 3)
    assert gated.started()[2] == "/srv/pg/c"
    assert (status(client, a)["status"], status(client, a)["state"]) == ("FAILED", "lost")
    assert processes.group_members(worker["pid"]) == []
    assert status(client, d)["state"] == "queued"


def test_slots_are_files_under_barman_home_named_by_host(client, gated, barman_files):
    a, b, c, d = post_four(client, gated)
    hosts = barman_files.home / "jobs" / claims.HOSTS_DIR
    (host,) = hosts.iterdir()
    slots = {json.loads(p.read_text())["operation_id"]: json.loads(p.read_text())["running"]
             for p in host.glob("*.slot")}
    assert slots == {a: True, b: True, c: False, d: False}
    for destination in ("a", "b", "c", "d"):
        gated.open(f"/srv/pg/{destination}")
    for op_id in (a, b, c, d):
        wait_for(lambda op_id=op_id: status(client, op_id)["status"] == "DONE")
    assert list(host.glob("*.slot")) == []  # every slot given back


def test_the_status_document_says_queued_while_the_worker_waits_and_running_once_it_has_a_slot():
    from pg_backup_api.core.model import describe
    from pg_backup_api.core.records import Record

    record = Record("20261127T093201", {"operation_type": "recovery"}, None)
    waiting = "pg-backup-api: waiting for a slot on db2 (4 recoveries run there, ...); number 1 in the queue\n"
    doc = describe(record, waiting)
    assert (doc["status"], doc["state"], doc["phase"]) == ("IN_PROGRESS", "queued", "waiting for a slot on db2")
    doc = describe(record, waiting + "pg-backup-api: got a slot on db2 after 3.2 s\n")
    assert (doc["status"], doc["state"], doc["phase"]) == ("IN_PROGRESS", "running", "preparing")
    doc = describe(record, waiting + "pg-backup-api: got a slot on db2 after 3.2 s\nCopying the base backup.\n")
    assert (doc["state"], doc["phase"]) == ("running", "copying base backup")


def test_an_unreadable_slot_counts_as_running_and_doctor_lists_and_moves_it(barman_files, capsys, monkeypatch):
    from pg_backup_api import cli

    monkeypatch.setenv("PG_BACKUP_API_BARMAN_CONF", str(barman_files.conf))
    settings = barman_files.conf.parent / "pg-backup-api.conf"
    settings.write_text("[api]\n")
    monkeypatch.setenv("PG_BACKUP_API_CONFIG", str(settings))
    home = barman_files.home
    slots = claims.Claims(lambda: home / "jobs", lambda server, op_id: None)
    path = slots.slot_path("db2", "pg", "20261127T093201")
    path.parent.mkdir(parents=True)
    path.write_text("{")
    assert slots.take_slot("db2", "pg", "20261127T093202", limit=1) == (1, 1)  # fails closed: it waits
    assert slots.take_slot("db2", "pg", "20261127T093202", limit=2) is None
    assert cli.main(["doctor"]) == 1
    assert f"FAIL state-files: {path} cannot be read" in capsys.readouterr().out
    assert cli.main(["doctor", "--fix"]) == 0
    assert not path.exists()


def count_opens(path: Path):
    """Start counting the opens of *path* (by any process); the callable returned says how many so far."""
    import inotify_simple

    flags = inotify_simple.flags
    notify = inotify_simple.INotify(nonblocking=True)
    # With the closes watched too, no two events in a row are alike: the kernel merges those that are.
    notify.add_watch(path, flags.OPEN | flags.CLOSE_WRITE | flags.CLOSE_NOWRITE)
    seen = [0]

    def opens() -> int:
        seen[0] += sum(1 for event in notify.read(timeout=0) if event.mask & flags.OPEN)
        return seen[0]

    return opens


def test_a_queued_recovery_waits_without_polling(client, gated, barman_files):
    a, b, c, d = post_four(client, gated)
    lock = barman_files.home / "jobs" / claims.CLAIMS_DIR / claims.LOCK_FILE
    opens = count_opens(lock)
    time.sleep(3)  # c and d wait meanwhile: they ask for a slot (under the claims' lock) only when one is freed
    assert opens() <= 2  # each may ask once more right after its watch is set up, then sleeps
    gated.open("/srv/pg/a")
    wait_for(lambda: len(gated.started()) == 3)  # a's slot given back wakes c at once
    assert status(client, c)["state"] == "running"


@pytest.fixture
def bounded(tmp_path, monkeypatch, barman_files):
    """Workers and service agree: 2 recoveries at once per host, at most 2 waiting per host and 3 in all."""
    limits = "max_recoveries_per_host = 2\nmax_queued_per_host = 2\nmax_queued = 3\n"
    install_stand_in_barman(tmp_path, monkeypatch, barman_files, GATED_BARMAN, f"[api]\n{limits}")
    fake = Gated(tmp_path)
    monkeypatch.setenv("FAKE_BARMAN_STARTS", str(fake.starts_file))
    monkeypatch.setenv("FAKE_GATE", str(fake.gates))
    settings = Settings(barman_conf=str(barman_files.conf), max_recoveries_per_host=2, max_queued_per_host=2,
                        max_queued=3)
    yield create_app(settings).test_client(), fake
    for gate in "abcdefghij":
        fake.open(f"/srv/pg/{gate}")


def test_a_recovery_beyond_the_queue_bounds_is_a_429_with_retry_after_and_stores_nothing(bounded, barman_files):
    client, gated = bounded

    def post(destination: str, host: str):
        body = {**BODY, "destination_directory": f"/srv/pg/{destination}", "remote_ssh_command": f"ssh pg@{host}"}
        return client.post("/servers/pg/operations", json=body)

    for destination in "abcd":  # a and b run on 10.0.0.2, c and d wait there
        assert post(destination, "10.0.0.2").status_code == 202
    jobs = sorted((barman_files.home / "pg" / "jobs").glob("*.json"))
    refused = post("e", "10.0.0.2")
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, str(claims.QUEUE_RETRY_AFTER))
    assert refused.json["error"].startswith("2 recoveries wait for a slot on 10.0.0.2 already (max_queued_per_host")
    assert sorted((barman_files.home / "pg" / "jobs").glob("*.json")) == jobs
    for destination in "fgh":  # f and g run on another host, h waits there: 3 wait in all
        assert post(destination, "10.0.0.3").status_code == 202
    refused = post("i", "10.0.0.3")
    assert refused.status_code == 429
    assert refused.json["error"].startswith("3 recoveries wait for a slot already, on all hosts together")
    # A recovery that would start at once is never refused: a third host is free.
    assert post("j", "10.0.0.4").status_code == 202
    # Once one of the waiting ones is canceled, there is room again.
    def queued() -> list:
        return [op["id"] for op in client.get("/servers/pg/operations").json["operations"]
                if client.get(f"/servers/pg/operations/{op['id']}").json["state"] == "queued"]

    waiting = wait_for(lambda: len(queued()) == 3 and queued())
    assert client.post(f"/servers/pg/operations/{waiting[0]}/cancel").status_code == 200
    assert post("e", "10.0.0.2").status_code == 202


def test_the_queue_bounds_come_from_the_settings_file_and_the_environment(tmp_path):
    conf = tmp_path / "api.conf"
    conf.write_text("[api]\nmax_queued_per_host = 3\nmax_queued = 0\n")
    settings = Settings.from_env({"PG_BACKUP_API_CONFIG": str(conf), "PG_BACKUP_API_MAX_QUEUED": "7"})
    assert (settings.max_queued_per_host, settings.max_queued) == (3, 7)
    assert (Settings.from_env({}).max_queued_per_host, Settings.from_env({}).max_queued) == (16, 64)
    conf.write_text("[api]\nmax_queued = -1\n")
    with pytest.raises(ValueError, match="max_queued must be an integer from 0 to 10000"):
        Settings.from_env({"PG_BACKUP_API_CONFIG": str(conf)})


def test_a_wait_for_a_slot_ends_when_a_slot_file_is_removed_or_a_signal_arrives(tmp_path):
    import threading

    host = tmp_path / "host"
    host.mkdir()
    held = host / f"20261127T093201.abc{claims.SLOT_SUFFIX}"
    held.write_text("{}")
    waits = claims.SlotWaits(host)
    readable, writable = os.pipe()

    def waiting() -> threading.Thread:
        thread = threading.Thread(target=waits.wait, args=(600, readable))
        thread.start()
        return thread

    try:
        thread = waiting()
        (host / f"20261127T093202.abc{claims.SLOT_SUFFIX}").write_text("{}")  # a new arrival frees nothing
        held.write_text('{"running": true}')  # nor does a slot taken
        time.sleep(0.5)
        assert thread.is_alive()
        held.unlink()  # a slot given back
        thread.join(10)
        assert not thread.is_alive()
        thread = waiting()
        os.write(writable, b"\x0f")  # what the interpreter writes on SIGTERM (signal.set_wakeup_fd)
        thread.join(10)
        assert not thread.is_alive()
        assert os.read(readable, 16) == b"\x0f"  # drained: the next wait is not woken by it
        # Without a watch (no inotify, no such folder), the wait still ends: it looks again a while later.
        unwatched = claims.SlotWaits(tmp_path / "no-such-host")
        thread = threading.Thread(target=unwatched.wait, args=(600, readable))
        thread.start()
        thread.join(10)
        assert not thread.is_alive()
    finally:
        os.write(writable, b"\0")
        waits.close()
        os.close(readable)
        os.close(writable)
