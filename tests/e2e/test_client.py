"""The client commands, as installed, against the real service: a recovery followed to its end."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from pg_backup_api.core.model import PHASE_MARKERS

from .conftest import VENV

pytestmark = pytest.mark.e2e

CLI = str(VENV / "bin" / "pg-backup-api")
# A recovery may first wait for a slot on its host (max_recoveries_per_host), then goes through these.
PHASES = ["waiting for a slot", *dict.fromkeys(phase for _, phase in PHASE_MARKERS)]


def client(service, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG_BACKUP_API_")}
    return subprocess.run([CLI, *args, "--url", service.url], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, env=env, timeout=600)


def recover(sandbox, service, destination, ssh_command, backup="latest"):
    return client(service, "recover", "--server", sandbox["BARMAN_SERVER"], "--backup", backup,
                  "--destination", destination, "--ssh-command", ssh_command, "--wait")


def test_recover_wait_exits_0_and_the_restored_cluster_has_the_rows(sandbox, service):
    destination = sandbox.restore_dir("e2e-client")
    # The sandbox's own backup, which holds ROWS_CHECK: other tests may take newer ones.
    done = recover(sandbox, service, destination, sandbox["SSH_COMMAND"], backup=sandbox["BACKUP_ID"])
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    op_id = lines[0]
    # Not a terminal: one line per phase seen, in the order of a restore (the first second's phases
    # may pass unseen: a multiplexed restore of the sandbox takes about two seconds).
    progress = [re.fullmatch(r"\[\d\d:\d\d\] IN_PROGRESS (.+)", line) for line in lines[1:-1]]
    assert all(progress), lines
    seen = [re.sub(r" on \S+$", "", match.group(1)) for match in progress]
    assert seen == sorted(set(seen), key=PHASES.index), lines
    assert f" DONE operation {op_id} (recovery) in " in lines[-1]
    assert "Traceback" not in done.stderr

    shown = client(service, "show", "--server", sandbox["BARMAN_SERVER"], op_id)
    assert shown.returncode == 0, shown.stderr
    assert "DONE (succeeded)" in shown.stdout
    assert f"resolved backup  {sandbox['BACKUP_ID']}" in shown.stdout
    listed = client(service, "operations", "--server", sandbox["BARMAN_SERVER"], "--status", "DONE")
    assert [op_id, "recovery"] in [line.split() for line in listed.stdout.splitlines()]

    with sandbox.copy(destination) as port:
        assert sandbox.psql(port, sandbox["ROWS_QUERY"]) == sandbox["ROWS_CHECK"]


def test_a_failing_recover_wait_exits_1_with_barmans_error(sandbox, service):
    # A destination that holds a file: Barman refuses it.
    failed = recover(sandbox, service, str(sandbox.holding_files("e2e-client-not-empty")), sandbox["SSH_COMMAND"])
    assert failed.returncode == 1, failed.stdout + failed.stderr
    op_id = failed.stdout.splitlines()[0]
    assert "ERROR: The restore operation cannot proceed" in failed.stderr, failed.stderr  # barman's words
    assert f"FAILED operation {op_id} (failed): barman exited with code" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_wait_on_a_corrupt_operation_ends_with_the_reason(sandbox, service):
    """A corrupt operation's stream used to run on for ever, and `--wait` with it."""
    server = sandbox["BARMAN_SERVER"]
    # A destination that holds a file: Barman refuses it, so the operation ends FAILED at once.
    failed = recover(sandbox, service, str(sandbox.holding_files("e2e-client-corrupt")), sandbox["SSH_COMMAND"])
    assert failed.returncode == 1, failed.stdout + failed.stderr
    op_id = failed.stdout.splitlines()[0]
    output = Path(sandbox["BARMAN_HOME"]) / server / "output" / f"{op_id}.json"
    kept = output.read_bytes()
    try:
        with open(output, "w") as f:  # the same file (owner, mode), its contents broken
            f.write('{"success": fal')
        waited = client(service, "wait", "--server", server, op_id)
        assert waited.returncode == 1, waited.stdout + waited.stderr
        assert f"FAILED operation {op_id} (corrupt): " in waited.stderr
        assert str(output) in waited.stderr
    finally:
        output.write_bytes(kept)
    assert client(service, "wait", "--server", server, op_id).returncode == 1  # FAILED as it was
