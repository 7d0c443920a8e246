"""Hostile input never reaches a shell, and tokens guard the real service when enabled."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Dict

import pytest
import requests

from tests.test_ssh_command import HOSTILE

from .conftest import VENV, Front, Service

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


def post_failing_recovery(base_url: str, sandbox, name: str, headers: Dict[str, str], **kw: Any) -> str:
    """A recovery into a destination that holds a file (Barman refuses it at once, touching nothing); its id."""
    response = requests.post(f"{base_url}/servers/{sandbox['BARMAN_SERVER']}/operations", headers=headers, json={
        "type": "recovery", "backup_id": "latest", "destination_directory": str(sandbox.holding_files(name)),
        "remote_ssh_command": sandbox["SSH_COMMAND"]}, timeout=60, **kw)
    assert response.status_code == 202, response.text
    return response.json()["operation_id"]


def test_a_forged_certificate_subject_from_loopback_is_not_recorded(sandbox, service):
    """Any local user reaches the service on 127.0.0.1, the address the proxy connects from."""
    server = sandbox["BARMAN_SERVER"]
    forged = [{"X-Client-Cert-Subject": "CN=admin\x1b]0;owned\x07"},
              {"X-Client-Cert-Subject": "CN=admin", "X-Pg-Backup-Api-Proxy-Secret": "pgba_guessed" * 4}]
    for n, headers in enumerate(forged):
        op_id = post_failing_recovery(service.url, sandbox, f"forged-subject-{n}", headers)
        status = service.wait_until_ended(server, op_id)
        assert "requested_by" not in status, status
        job = json.loads((Path(sandbox["BARMAN_HOME"]) / server / "jobs" / f"{op_id}.json").read_text())
        assert "requested_by" not in job
        audit = Path(sandbox["BARMAN_HOME"]) / "pg-backup-api-audit.log"
        line = next(json.loads(text) for text in audit.read_text().splitlines() if op_id in text)
        assert "client_cert_subject" not in line and line["remote_addr"] == "127.0.0.1"


def test_a_recovery_through_apache_records_the_verified_subject(sandbox, service, apache_front: Front):
    op_id = post_failing_recovery(apache_front.url, sandbox, "subject-front", {"X-Client-Cert-Subject": "CN=x"},
                                      **apache_front.auth)
    status = service.wait_until_ended(sandbox["BARMAN_SERVER"], op_id)
    assert status["requested_by"] == "cert:CN=patroni,O=pg-backup-api tests"
