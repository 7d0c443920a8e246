import argparse
import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest

from pg_backup_api.cli import duration, main
from pg_backup_api.core.model import now_utc, timestamp


def test_durations():
    assert duration("30d") == timedelta(days=30)
    assert duration("12h") == timedelta(hours=12)
    assert duration("90") == timedelta(seconds=90)
    for bad in ["", "d", "3x", "-1d", "1.5d", "²d", "١d", "9" * 5000]:
        with pytest.raises(argparse.ArgumentTypeError):
            duration(bad)


def write_operation(home, server, op_id, ended_days_ago=None):
    root = home / server if server else home
    (root / "jobs" / ".workers").mkdir(parents=True, exist_ok=True)
    (root / "output").mkdir(parents=True, exist_ok=True)
    job = {"operation_type": "recovery", "start_time": timestamp(now_utc() - timedelta(days=40))}
    (root / "jobs" / f"{op_id}.json").write_text(json.dumps(job))
    (root / "jobs" / ".workers" / f"{op_id}.log").write_text("log")
    if ended_days_ago is not None:
        end = timestamp(now_utc() - timedelta(days=ended_days_ago))
        (root / "output" / f"{op_id}.json").write_text(json.dumps({**job, "success": True, "end_time": end}))
    else:  # running: a live worker (this test process) so it is not reported lost
        (root / "jobs" / ".workers" / f"{op_id}.worker").write_text(json.dumps(_me()))


def _me():
    from pg_backup_api.worker.processes import identity
    return identity().to_json()


def test_prune_removes_old_finished_operations_only(barman_files, monkeypatch, capsys):
    monkeypatch.setenv("PG_BACKUP_API_BARMAN_CONF", str(barman_files.conf))
    home = barman_files.home
    write_operation(home, "pg", "20261001T000000", ended_days_ago=35)
    write_operation(home, "pg", "20261002T000000", ended_days_ago=5)
    write_operation(home, "pg", "20261003T000000")
    write_operation(home, None, "20261004T000000", ended_days_ago=60)

    assert main(["prune", "--older-than", "30d", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove pg 20261001T000000" in out
    assert "would remove (instance) 20261004T000000" in out
    assert "2 operation(s) would remove" in out
    assert (home / "pg" / "jobs" / "20261001T000000.json").exists()

    assert main(["prune", "--older-than", "30d"]) == 0
    assert "2 operation(s) removed" in capsys.readouterr().out
    assert sorted(os.listdir(home / "pg" / "jobs")) == [".workers", "20261002T000000.json", "20261003T000000.json"]
    assert sorted(os.listdir(home / "pg" / "jobs" / ".workers")) == [
        "20261002T000000.log", "20261003T000000.log", "20261003T000000.worker"]
    assert os.listdir(home / "pg" / "output") == ["20261002T000000.json"]


def test_prune_needs_an_age(barman_files):
    proc = subprocess.run([sys.executable, "-m", "pg_backup_api", "prune"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--older-than" in proc.stderr


def test_client_commands_do_not_need_the_service_settings(monkeypatch, capsys):
    monkeypatch.setenv("PG_BACKUP_API_CONFIG", "/nonexistent/pg-backup-api.conf")
    monkeypatch.setenv("PG_BACKUP_API_PORT", "not-a-port")
    assert main(["operations", "--url", "http://127.0.0.1:1", "--server", "pg"]) == 1
    assert "cannot connect to http://127.0.0.1:1" in capsys.readouterr().err
