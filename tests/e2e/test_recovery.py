"""A real recovery through the API: Barman restores over ssh, and the restored cluster holds the rows."""

import re
import subprocess
from pathlib import Path

import pytest

from .conftest import VENV
from .test_security import count_jobs

pytestmark = pytest.mark.e2e


def recovery_body(sandbox, destination, ssh_command=None, backup_id="latest"):
    return {"type": "recovery", "backup_id": backup_id, "destination_directory": destination,
            "remote_ssh_command": ssh_command or sandbox["SSH_COMMAND"]}


def test_recovery_over_ssh_restores_the_rows_written_before_the_backup(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    destination = sandbox.restore_dir("e2e-ok")
    response = service.post(f"/servers/{server}/operations", json=recovery_body(sandbox, destination))
    assert response.status_code == 202, response.text
    op_id = response.json()["operation_id"]
    assert response.headers["Location"].endswith(f"/servers/{server}/operations/{op_id}")

    status = service.wait_until_ended(server, op_id)
    assert status["status"] == "DONE", status.get("output")
    assert status["exit_code"] == 0
    backups = service.get(f"/servers/{server}/backups").json()["backups"]
    assert status["resolved_backup_id"] == [b["backup_id"] for b in backups if b["status"] == "DONE"][-1]
    assert {"id": op_id, "type": "recovery"} in service.get(f"/servers/{server}/operations").json()["operations"]

    with sandbox.copy(destination) as port:
        rows = sandbox.psql(port, "SELECT count(*), md5(string_agg(label, ',' ORDER BY id)) "
                                  "FROM known_rows WHERE id <= 100")
        assert rows == sandbox["ROWS_CHECK"]


def test_a_recovery_to_a_host_the_service_cannot_reach_is_refused_with_ssh_s_reason(sandbox, service):
    # Barman would fail it anyway ("Unable to connect to the target host"); its paths cannot be looked at.
    server = sandbox["BARMAN_SERVER"]
    before = count_jobs(sandbox)
    body = recovery_body(sandbox, sandbox.restore_dir("e2e-unreachable"),
                         ssh_command="ssh -p 1 -o ConnectTimeout=5 postgres@127.0.0.1")
    response = service.post(f"/servers/{server}/operations", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert re.fullmatch(r"field 'remote_ssh_command': cannot look at the recovery's paths on the target host "
                        r"postgres@127\.0\.0\.1: ssh exited with code 255: .*Connection refused.*", error), error
    assert count_jobs(sandbox) == before


def test_a_recovery_into_a_directory_that_holds_files_fails_with_barmans_reason_and_keeps_them(sandbox, service):
    # Barman (>= 3.16) refuses a destination that is not empty rather than rsync --delete over it.
    server = sandbox["BARMAN_SERVER"]
    destination = Path(sandbox.restore_dir("e2e-not-empty"))
    destination.mkdir(parents=True)
    kept = destination / "somebody-elses.data"
    kept.write_text("precious\n")
    subprocess.run(["chown", "-R", "postgres:postgres", str(destination)], check=True)
    body = recovery_body(sandbox, str(destination))
    op_id = service.post(f"/servers/{server}/operations", json=body).json()["operation_id"]
    status = service.wait_until_ended(server, op_id)
    assert status["status"] == "FAILED" and status["exit_code"] != 0
    assert "is not empty" in status["output"], status["output"]
    assert status["reason"].startswith("barman exited with code 1: The restore operation cannot proceed "
                                       "because the destination folder"), status["reason"]
    assert sorted(p.name for p in destination.iterdir()) == [kept.name]
    assert kept.read_text() == "precious\n"


def test_the_recovered_backup_is_the_one_validated_at_post_time(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    # A destination that holds a file: Barman refuses it at once, after the backup was chosen.
    body = recovery_body(sandbox, str(sandbox.holding_files("e2e-alias")), backup_id="oldest")
    op_id = service.post(f"/servers/{server}/operations", json=body).json()["operation_id"]
    status = service.wait_until_ended(server, op_id)
    assert status["backup_id"] == "oldest"
    assert status["resolved_backup_id"] == sandbox["BACKUP_ID"]


@pytest.mark.parametrize("method, path, kwargs, code", [
    ("get", "/servers/nope/operations", {}, 404),
    ("get", "/servers/{server}/operations/20000101T000000", {}, 404),
    ("post", "/servers/nope/operations", {"json": {"backup_id": "latest"}}, 404),
    ("post", "/servers/{server}/operations", {"data": "x", "headers": {"Content-Type": "text/plain"}}, 400),
    ("post", "/servers/{server}/operations", {"json": {"backup_id": "latest"}}, 400),
    ("post", "/servers/{server}/operations",
     {"json": {"backup_id": "no-such-backup", "destination_directory": "/srv/x",
               "remote_ssh_command": "ssh h"}}, 404),
    ("delete", "/status", {}, 405),
    ("get", "/no/such/endpoint", {}, 404),
])
def test_every_error_of_the_contract_is_json(sandbox, service, method, path, kwargs, code):
    response = getattr(__import__("requests"), method)(
        service.url + path.format(server=sandbox["BARMAN_SERVER"]), timeout=30, **kwargs)
    assert response.status_code == code
    assert response.headers["Content-Type"].startswith("application/json")
    assert isinstance(response.json()["error"], str)


def test_diagnose_returns_barmans_document(sandbox, service):
    doc = service.get("/diagnose").json()
    assert sandbox["BARMAN_SERVER"] in doc["servers"]
    assert "global" in doc


def test_status_command_reports_up_and_down(service):
    cli = str(VENV / "bin" / "pg-backup-api")
    up = subprocess.run([cli, "status", "--port", str(service.port)], capture_output=True, text=True)
    assert up.returncode == 0, up.stdout
    assert "is up" in up.stdout
    down = subprocess.run([cli, "status", "--port", "1"], capture_output=True, text=True)
    assert down.returncode == 1
    assert "not reachable" in down.stdout
