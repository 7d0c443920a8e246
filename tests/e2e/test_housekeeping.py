"""What an operator does with the history on the real stack: filter and page through it, prune what ended
long ago, and put an unreadable state file aside with `doctor --fix`; the running service sees each
change at the next request."""

import subprocess
import time
from pathlib import Path

import pytest

from .conftest import VENV

pytestmark = pytest.mark.e2e

def pg_backup_api(sandbox, *args: str) -> subprocess.CompletedProcess:
    """The command as the barman user runs it, beside the running service."""
    return subprocess.run(["runuser", "-u", sandbox["BARMAN_USER"], "--", "env",
                           f"PG_BACKUP_API_BARMAN_CONF={sandbox['BARMAN_CONF']}", f"HOME={sandbox['BARMAN_HOME']}",
                           str(VENV / "bin" / "pg-backup-api"), *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def recover(sandbox, service, name: str, fail: bool = False) -> str:
    """A recovery into RESTORE_PARENT/*name*; with *fail*, into a directory that holds a file, which Barman refuses."""
    destination = str(sandbox.holding_files(name)) if fail else sandbox.restore_dir(name)
    body = {"type": "recovery", "backup_id": "latest", "destination_directory": destination,
            "remote_ssh_command": sandbox["SSH_COMMAND"]}
    response = service.post(f"/servers/{sandbox['BARMAN_SERVER']}/operations", json=body)
    assert response.status_code == 202, response.text
    return response.json()["operation_id"]


def listed(service, server: str, query: str = "") -> list:
    response = service.get(f"/servers/{server}/operations{query}")
    assert response.status_code == 200, response.text
    return [o["id"] for o in response.json()["operations"]]


def test_status_filters_and_pages_walk_the_real_history(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    ok, bad = recover(sandbox, service, "e2e-filter-ok"), recover(sandbox, service, "e2e-filter-bad", fail=True)
    assert service.wait_until_ended(server, ok)["status"] == "DONE"
    assert service.wait_until_ended(server, bad)["status"] == "FAILED"
    everything = listed(service, server)
    done, failed = listed(service, server, "?status=DONE"), listed(service, server, "?status=FAILED")
    running = listed(service, server, "?status=IN_PROGRESS")
    assert ok in done and ok not in failed and bad in failed and bad not in done
    assert sorted(done + failed + running) == sorted(everything)
    for op_id in done:
        assert service.get(f"/servers/{server}/operations/{op_id}").json()["status"] == "DONE"
    walked, query = [], "?type=recovery&limit=2"
    while True:
        page = service.get(f"/servers/{server}/operations{query}").json()
        assert len(page["operations"]) <= 2
        walked += [o["id"] for o in page["operations"]]
        if "next" not in page:
            break
        query = f"?type=recovery&limit=2&after={page['next']}"
    assert walked == listed(service, server, "?type=recovery")
    assert ok in walked and bad in walked


def test_prune_removes_what_ended_before_the_cutoff_and_the_service_forgets_it_at_once(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    old = recover(sandbox, service, "e2e-prune-old", fail=True)
    assert service.wait_until_ended(server, old)["status"] == "FAILED"
    time.sleep(2)  # ended at least 2 s ago: older than the cutoff below
    dry = pg_backup_api(sandbox, "prune", "--older-than", "1", "--server", server, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {server} {old} recovery FAILED" in dry.stdout
    assert old in listed(service, server)
    done = pg_backup_api(sandbox, "prune", "--older-than", "1", "--server", server)
    assert done.returncode == 0, done.stderr
    assert f"removed {server} {old} recovery FAILED" in done.stdout
    home = Path(sandbox["BARMAN_HOME"]) / server
    assert not (home / "jobs" / f"{old}.json").exists() and not (home / "output" / f"{old}.json").exists()
    assert old not in listed(service, server)
    assert service.get(f"/servers/{server}/operations/{old}").status_code == 404
    again = pg_backup_api(sandbox, "prune", "--older-than", "1", "--server", server)
    assert "0 operation(s) removed" in again.stdout


def test_doctor_fix_puts_an_unreadable_job_file_aside_and_the_list_heals(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    op_id = recover(sandbox, service, "e2e-doctor", fail=True)
    assert service.wait_until_ended(server, op_id)["status"] == "FAILED"
    job = Path(sandbox["BARMAN_HOME"]) / server / "jobs" / f"{op_id}.json"
    job.write_text("")  # truncated in place, as a full disk or a crash of the host may leave it
    entry = [o for o in service.get(f"/servers/{server}/operations").json()["operations"] if o["id"] == op_id]
    assert entry == [{"id": op_id, "type": "unknown", "state": "corrupt"}]
    status = service.get(f"/servers/{server}/operations/{op_id}")
    assert status.status_code == 200 and status.json()["status"] == "FAILED"
    assert status.json()["state"] == "corrupt"

    found = pg_backup_api(sandbox, "doctor")
    assert found.returncode == 1 and str(job) in found.stdout, found.stdout
    fixed = pg_backup_api(sandbox, "doctor", "--fix")
    assert "moved to" in fixed.stdout, fixed.stdout
    quarantined = list((Path(sandbox["BARMAN_HOME"]) / "jobs" / "quarantine" / server).glob(f"{op_id}.json*"))
    assert len(quarantined) == 1 and quarantined[0].read_text() == ""
    assert op_id not in listed(service, server)
    assert pg_backup_api(sandbox, "doctor").returncode == 0
