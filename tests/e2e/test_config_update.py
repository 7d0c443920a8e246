"""config_update against the real Barman: hostile edits are refused before Barman sees them, and the
service reads the configuration exactly as the `barman` command does."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import VENV

pytestmark = pytest.mark.e2e


def barman(sandbox, *args: str) -> subprocess.CompletedProcess:
    """The `barman` command as the Barman user, with the service's configuration file."""
    return subprocess.run(["runuser", "-u", sandbox["BARMAN_USER"], "--", "env", f"HOME={sandbox['BARMAN_HOME']}",
                           str(VENV / "bin" / "barman"), "-c", sandbox["BARMAN_CONF"], *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


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
