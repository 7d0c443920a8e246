"""Hostile input never reaches a shell, and tokens guard the real service when enabled."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.test_ssh_command import HOSTILE

from .conftest import VENV, Service

pytestmark = pytest.mark.e2e


def count_jobs(sandbox) -> int:
    jobs = Path(sandbox["BARMAN_HOME"]) / sandbox["BARMAN_SERVER"] / "jobs"
    return len(list(jobs.glob("*.json"))) if jobs.exists() else 0


def test_hostile_ssh_commands_and_destinations_are_refused_and_run_nothing(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    marker = Path(sandbox["RESTORE_PARENT"]) / "pwned"
    before = count_jobs(sandbox)
    bodies = [{"remote_ssh_command": cmd.replace("/tmp/pwned", str(marker)),
               "destination_directory": sandbox.restore_dir("hostile")} for cmd in HOSTILE]
    bodies += [{"remote_ssh_command": sandbox["SSH_COMMAND"], "destination_directory": dest.replace("M", str(marker))}
               for dest in ["/srv/x; touch M", "/srv/$(touch M)", "/srv/`touch M`", "/srv/x\ntouch M",
                            "/srv/x' ; touch M ; '", "-rf M", "/srv/../M", "/", "/etc", "relative"]]
    for body in bodies:
        response = service.post(f"/servers/{server}/operations", json={"backup_id": "latest", **body})
        assert 400 <= response.status_code < 500, body
        assert "error" in response.json()
    time.sleep(1)
    assert not marker.exists()
    assert count_jobs(sandbox) == before


def test_a_known_hosts_file_in_barmans_home_is_refused_and_barman_keeps_working(sandbox, service):
    # Accepted, ssh would append the target's host key to Barman's own configuration file,
    # and every barman command after it would fail to read that file.
    server = sandbox["BARMAN_SERVER"]
    auto_conf = Path(sandbox["BARMAN_HOME"]) / ".barman.auto.conf"
    before = auto_conf.read_bytes() if auto_conf.exists() else None
    jobs = count_jobs(sandbox)
    command = (f"ssh -p {sandbox['SSH_PORT']} -o UserKnownHostsFile={auto_conf} "
               "-o StrictHostKeyChecking=accept-new postgres@127.0.0.1")
    response = service.post(f"/servers/{server}/operations", json={
        "type": "recovery", "backup_id": "latest", "destination_directory": sandbox.restore_dir("e2e-known-hosts"),
        "remote_ssh_command": command})
    assert 400 <= response.status_code < 500, response.text
    assert "UserKnownHostsFile" in response.json()["error"]
    time.sleep(1)
    assert (auto_conf.read_bytes() if auto_conf.exists() else None) == before
    assert count_jobs(sandbox) == jobs
    listed = subprocess.run(["runuser", "-u", sandbox["BARMAN_USER"], "--", str(VENV / "bin" / "barman"),
                             "-c", sandbox["BARMAN_CONF"], "list-backups", server],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert listed.returncode == 0, listed.stderr
    assert sandbox["BACKUP_ID"] in listed.stdout


def test_tokens_on_the_real_service(sandbox):
    tokens_file = Path(sandbox["BARMAN_HOME"]) / "tokens.json"
    create = subprocess.run(
        ["runuser", "-u", sandbox["BARMAN_USER"], "--", "env", f"PG_BACKUP_API_TOKENS_FILE={tokens_file}",
         str(VENV / "bin" / "pg-backup-api"), "token", "create", "monitoring", "--scope", "read"],
        capture_output=True, text=True, check=True)
    secret = create.stdout.strip()
    service = Service(sandbox, {"PG_BACKUP_API_AUTH": "token", "PG_BACKUP_API_TOKENS_FILE": str(tokens_file)})
    service.start()
    try:
        server = sandbox["BARMAN_SERVER"]
        assert service.get("/status").json() == "OK"
        assert service.get(f"/servers/{server}/operations").status_code == 401
        ok = service.get(f"/servers/{server}/operations", headers={"Authorization": f"Bearer {secret}"})
        assert ok.status_code == 200
        denied = service.post(f"/servers/{server}/operations", headers={"Authorization": f"Bearer {secret}"},
                              json={"backup_id": "latest"})
        assert denied.status_code == 403
        assert denied.json()["error"].startswith("token 'monitoring' has scope 'read'")
    finally:
        service.stop()
