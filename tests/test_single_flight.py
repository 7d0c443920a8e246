"""Slow Barman reads (check, status, diagnose) run one at a time: shared in a process, 429 across processes."""

from __future__ import annotations

import fcntl
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pg_backup_api import create_app
from pg_backup_api.barman_io import adapter as barman_adapter
from pg_backup_api.core.errors import TooBusy
from pg_backup_api.rules.settings import Settings
from pg_backup_api.store.single_flight import SingleFlight


def test_callers_in_one_process_share_one_run(tmp_path):
    flight = SingleFlight(lambda: tmp_path, retry_after=5)
    release, calls = threading.Event(), []

    def slow_read():
        calls.append(1)
        release.wait(10)
        return {"answer": len(calls)}

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(flight.run, "check\0pg", "barman check", slow_read) for _ in range(8)]
        threading.Timer(0.3, release.set).start()
        results = [f.result(timeout=10) for f in futures]
    assert calls == [1]
    assert all(r is results[0] for r in results)


def test_a_failure_is_shared_too_and_the_next_call_runs_again(tmp_path):
    flight = SingleFlight(lambda: tmp_path, retry_after=5)
    release = threading.Event()

    def failing():
        release.wait(10)
        raise RuntimeError("barman failed")

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(flight.run, "k", "barman check", failing) for _ in range(3)]
        threading.Timer(0.3, release.set).start()
        for future in futures:
            with pytest.raises(RuntimeError, match="barman failed"):
                future.result(timeout=10)
    assert flight.run("k", "barman check", lambda: "again") == "again"


def test_different_keys_do_not_wait_for_each_other(tmp_path):
    flight = SingleFlight(lambda: tmp_path, retry_after=5)
    inner = flight.run("a", "a", lambda: flight.run("b", "b", lambda: "b inside a"))
    assert inner == "b inside a"


def test_another_process_running_the_same_read_gets_429_with_retry_after(barman_files, spawned, monkeypatch):
    # Two apps on the same Barman home stand for two gunicorn workers (two processes).
    first = create_app(Settings(barman_conf=str(barman_files.conf)), spawn=spawned).test_client()
    second = create_app(Settings(barman_conf=str(barman_files.conf)), spawn=spawned).test_client()
    entered, release = threading.Event(), threading.Event()

    def slow_barman(config_path, *args, timeout=120, json_format=True):
        if args[0] == "check":
            entered.set()
            release.wait(10)
        return {"pg": {"ssh": {"status": "OK"}}}

    monkeypatch.setattr(barman_adapter, "barman_json", slow_barman)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(first.get, "/servers/pg/check")
        assert entered.wait(10)
        busy = second.get("/servers/pg/check")
        other_server_read = second.get("/servers/pg")  # `barman status` is another key
        release.set()
        assert running.result(timeout=10).json["ok"] is True
    assert busy.status_code == 429
    assert busy.headers["Retry-After"] == "5"
    assert "barman check of server 'pg' is already running" in busy.json["error"]
    assert other_server_read.status_code == 200
    assert second.get("/servers/pg/check").status_code == 200  # free again once the first ended


def test_concurrent_requests_for_one_backup_share_one_show_backup_run(barman_files, spawned, monkeypatch):
    barman_files.add_backup("20261127T010000")
    client = create_app(Settings(barman_conf=str(barman_files.conf)), spawn=spawned)
    runs, release = [], threading.Event()

    def slow_barman(config_path, *args, timeout=120, json_format=True):
        runs.append(args)
        release.wait(10)
        return {"pg": {"backup_id": args[-1], "status": "DONE"}}

    monkeypatch.setattr(barman_adapter, "barman_json", slow_barman)
    with ThreadPoolExecutor(20) as pool:
        # The id and the alias name one backup: one run for both.
        futures = [pool.submit(client.test_client().get, f"/servers/pg/backups/{b}")
                   for b in ["20261127T010000", "latest"] * 10]
        threading.Timer(0.5, release.set).start()
        answers = [f.result(timeout=10) for f in futures]
    assert [a.status_code for a in answers] == [200] * 20
    assert {a.json["backup_id"] for a in answers} == {"20261127T010000"}
    assert runs == [("show-backup", "--", "pg", "20261127T010000")]


def test_another_process_showing_the_same_backup_gets_429_with_retry_after(barman_files, spawned, monkeypatch):
    barman_files.add_backup("20261127T010000")
    barman_files.add_backup("20261128T010000")
    first = create_app(Settings(barman_conf=str(barman_files.conf)), spawn=spawned).test_client()
    second = create_app(Settings(barman_conf=str(barman_files.conf)), spawn=spawned).test_client()
    entered, release = threading.Event(), threading.Event()

    def slow_barman(config_path, *args, timeout=120, json_format=True):
        if args[-1] == "20261127T010000":
            entered.set()
            release.wait(10)
        return {"pg": {"backup_id": args[-1]}}

    monkeypatch.setattr(barman_adapter, "barman_json", slow_barman)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(first.get, "/servers/pg/backups/20261127T010000")
        assert entered.wait(10)
        busy = second.get("/servers/pg/backups/20261127T010000")
        other_backup = second.get("/servers/pg/backups/20261128T010000")
        release.set()
        assert running.result(timeout=10).status_code == 200
    assert (busy.status_code, busy.headers["Retry-After"]) == (429, "5")
    assert "barman show-backup of backup '20261127T010000' is already running" in busy.json["error"]
    assert other_backup.status_code == 200


def test_a_read_that_hangs_is_stopped_after_check_timeout(barman_files, spawned, tmp_path, monkeypatch):
    hanging = tmp_path / "barman"
    hanging.write_text("#!/bin/sh\nexec sleep 30\n")
    hanging.chmod(hanging.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(barman_adapter, "barman_executable", lambda: str(hanging))
    client = create_app(Settings(barman_conf=str(barman_files.conf), check_timeout=0.5), spawn=spawned).test_client()
    response = client.get("/servers/pg/check")
    assert response.status_code == 502
    assert "did not answer within" in response.json["error"]
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _runs(p, str(hanging))]


def test_a_lock_held_by_another_process_is_refused_at_once_with_the_retry_delay(tmp_path):
    flight = SingleFlight(lambda: tmp_path, retry_after=7)
    flight.run("k", "barman diagnose", lambda: None)  # creates the lock file
    (lock_file,) = tmp_path.glob("*.lock")
    with open(lock_file) as held:  # another open file description: as another process would hold it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(TooBusy) as busy:
            flight.run("k", "barman diagnose", lambda: None)
    assert busy.value.retry_after == 7


def test_check_timeout_comes_from_the_settings_file(tmp_path):
    conf = tmp_path / "api.conf"
    conf.write_text("[api]\ncheck_timeout = 15\n")
    assert Settings.from_env({"PG_BACKUP_API_CONFIG": str(conf)}).check_timeout == 15
    assert Settings.from_env({}).check_timeout == 60


def _runs(pid: str, path: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return path.encode() in f.read()
    except OSError:
        return False
