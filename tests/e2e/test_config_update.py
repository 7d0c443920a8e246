"""config_update against the real Barman: hostile edits are refused before Barman sees them, and the
service reads the configuration exactly as the `barman` command does."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests.e2e.conftest import VENV, barman

pytestmark = pytest.mark.e2e


def description(service, server: str) -> str:
    return next(s for s in service.get("/servers").json()["servers"] if s["name"] == server)["description"]


def test_hostile_config_updates_are_refused_and_barman_keeps_working(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    for change, field in [
        ({"scope": "server", "server_name": "barman", "description": "x"}, "changes.0.server_name"),
        ({"scope": "server", "server_name": server, "description": "100% done"}, "changes.0.description"),
        ({"scope": "server", "server_name": "no-such-server", "description": "x"}, "changes.0.server_name"),
    ]:
        response = service.post("/operations", json={"type": "config_update", "changes": [change]})
        assert response.status_code == 400, response.text
        assert f"field '{field}'" in response.json()["error"]
    listed = barman(sandbox, "list-backups", server)
    assert listed.returncode == 0, listed.stderr
    cron = barman(sandbox, "cron")
    assert cron.returncode == 0, cron.stdout + cron.stderr
    assert service.get("/servers").json()["config_changes_queue"]["stuck"] is False
    doctor = subprocess.run(["runuser", "-u", sandbox["BARMAN_USER"], "--", "env",
                             f"PG_BACKUP_API_BARMAN_CONF={sandbox['BARMAN_CONF']}",
                             str(VENV / "bin" / "pg-backup-api"), "doctor"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr


def test_a_change_made_by_the_barman_command_is_seen_by_the_service(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    server_conf = Path(sandbox["BARMAN_CONF"]).parent / "barman.d" / f"{server}.conf"
    user = pwd.getpwnam(sandbox["BARMAN_USER"])
    original = server_conf.read_text()
    before = description(service, server)
    os.chown(server_conf, user.pw_uid, user.pw_gid)  # barman rewrites the file that holds the key
    try:
        changed = barman(sandbox, "config-update", json.dumps(
            [{"scope": "server", "server_name": server, "description": "changed by barman itself"}]))
        assert changed.returncode == 0, changed.stdout + changed.stderr
        assert description(service, server) == "changed by barman itself"
    finally:
        server_conf.write_text(original)
        os.chown(server_conf, 0, 0)
    assert description(service, server) == before


@contextmanager
def restored(*paths: Path) -> Iterator[None]:
    """Put each file back as it was (absent included) after the block, whatever happened in it."""
    kept = {p: (p.read_bytes(), p.stat()) if p.exists() else None for p in paths}
    try:
        yield
    finally:
        for path, was in kept.items():
            if was is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(was[0])
                os.chown(path, was[1].st_uid, was[1].st_gid)


def summary(service, server: str) -> dict:
    return next(s for s in service.get("/servers").json()["servers"] if s["name"] == server)


def settle(service, op_id: Optional[str]) -> None:
    """Wait for an operation a faulty answer started, so the files can be put back after it."""
    deadline = time.monotonic() + 120
    while op_id and time.monotonic() < deadline and service.get(f"/operations/{op_id}").json().get(
            "status") == "IN_PROGRESS":
        time.sleep(0.5)


def test_network_compression_on_a_postgres_server_is_refused_and_barman_keeps_working(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    auto = Path(sandbox["BARMAN_HOME"]) / ".barman.auto.conf"
    op_id = None
    with restored(auto):
        try:
            response = service.post("/operations", json={"type": "config_update", "changes": [
                {"scope": "server", "server_name": server, "network_compression": True}]})
            op_id = response.json().get("operation_id")
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert "field 'changes.0.network_compression'" in error and f"server '{server}'" in error
            assert "network_compression option is not supported by postgres backup_method" in error
        finally:
            settle(service, op_id)
        assert (summary(service, server)["disabled"], summary(service, server)["errors"]) == (False, [])
        checks = json.loads(barman(sandbox, "-f", "json", "check", server).stdout)[server]
        assert "configuration" not in checks  # Barman adds that check, FAILED, for a server it disables
        assert checks["postgresql"]["status"] == "OK"
        cron = barman(sandbox, "cron")
        assert cron.returncode == 0, cron.stdout + cron.stderr
        assert "Skipping temporarily disabled server" not in cron.stdout + cron.stderr


def test_a_server_barman_disables_shows_disabled_and_barmans_messages(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    server_conf = Path(sandbox["BARMAN_CONF"]).parent / "barman.d" / f"{server}.conf"
    with restored(server_conf):
        with open(server_conf, "a") as conf:
            conf.write("network_compression = true\n")  # what Barman disables a postgres server for
        assert json.loads(barman(sandbox, "-f", "json", "show-servers", server).stdout)[server]["disabled"] is True
        msg_list = json.loads(barman(sandbox, "diagnose").stdout)["servers"][server]["msg_list"]
        assert summary(service, server)["disabled"] is True
        assert summary(service, server)["errors"] == msg_list == [
            "network_compression option is not supported by postgres backup_method"]
    assert (summary(service, server)["disabled"], summary(service, server)["errors"]) == (False, [])
