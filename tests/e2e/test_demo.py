"""The README's first command: `scripts/demo` sets everything up, recovers the latest backup through
the API, starts the restored cluster and reads back the rows written before the backup;
`scripts/demo stop` leaves nothing of it running.

It runs the script whole, bootstrap included (a second bootstrap only checks what is in place).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from tests import sandbox as stack

from .conftest import ROOT, VENV, free_port, listening, unavailable

pytestmark = pytest.mark.e2e


def free_port_with_copy() -> int:
    """A free port whose neighbour 10 above is free too: the demo starts the restored copy there."""
    for _ in range(50):
        port = free_port()
        if port + 10 < 65536 and not listening(port + 10):
            return port
    raise AssertionError("no free port pair for the demo's cluster and its restored copy")


def demo(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "demo"), *args], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)


def left_running(directory: Path) -> str:
    found = subprocess.run(["pgrep", "-a", "-f", str(directory)], capture_output=True, text=True)
    return found.stdout.strip()


def assert_the_demo_restored_the_rows(run: subprocess.CompletedProcess, shown: str) -> None:
    """scripts/demo ended well: exit 0, and the restored cluster's count|md5 is the source's (100 rows)."""
    assert run.returncode == 0, shown
    assert "the API restored the backup and the rows match" in run.stdout, shown
    restored = re.search(r"^restored cluster: count\|md5 = (\S+)$", run.stdout, re.M)
    source = re.search(r"^source cluster:   count\|md5 = (\S+)$", run.stdout, re.M)
    assert restored and source, shown
    assert restored.group(1) == source.group(1) and restored.group(1).startswith("100|"), shown


def test_the_demo_recovers_through_the_api_reads_the_rows_back_and_stop_leaves_nothing_running():
    if os.geteuid() != 0:
        unavailable("scripts/demo runs as root")
    directory = Path(tempfile.mkdtemp(prefix="pgba-e2e-demo-"))
    api_port = free_port()
    env = {**os.environ, "PGBA_VENV": str(VENV), "PGBA_DEMO_PORT": str(api_port),
           "SANDBOX_PGPORT": str(free_port_with_copy()), "SANDBOX_SSH_PORT": str(free_port())}
    try:
        run = demo(str(directory), env=env)
        shown = run.stdout[-4000:] + run.stderr[-2000:]
        assert_the_demo_restored_the_rows(run, shown)
        assert re.search(r"-> DONE ", run.stdout), shown  # polled through the API until DONE

        # It leaves the service running for the operator to try, with the recovery in its list.
        server = stack.read_env(directory / "env")["BARMAN_SERVER"]
        operations = requests.get(f"http://127.0.0.1:{api_port}/servers/{server}/operations", timeout=10)
        assert operations.status_code == 200 and len(operations.json()["operations"]) == 1, operations.text

        stopped = demo("stop", str(directory), env=env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not listening(api_port)
        assert left_running(directory) == ""
    finally:
        pid_file = directory / "service.pid"
        if pid_file.exists():  # the demo failed before `stop`: end its service too
            subprocess.run(["kill", "-TERM", "--", f"-{pid_file.read_text().strip()}"], capture_output=True)
        stack.down(directory, purge=True)
