"""The sandbox itself (tests/sandbox): what the demo, the tests and the benchmark stand on.

One more sandbox is built next to the session's: both share the barman system user, so `down` on
one must find its own processes among the other's.
"""

import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from tests import sandbox as stack

from .conftest import ROOT, Sandbox, free_port, listening, sandbox_up

pytestmark = pytest.mark.e2e


def running(box: Sandbox) -> List[int]:
    """The processes `down` would stop for *box*."""
    return sorted(stack.sandbox_pids(stack.layout(box.directory), stack.account(box["BARMAN_USER"]).uid))


def long_lived(box: Sandbox) -> List[int]:
    """Its postmaster, sshd, cron loop and WAL receivers: what must survive another sandbox's `down`."""
    layout = stack.layout(box.directory)
    pids = [int((layout.pgdata / "postmaster.pid").read_text().split()[0]), stack.sshd_pid(layout),
            stack.cron_loop_pid(layout)]
    pids += [pid for pid, _, cmd in stack.processes() if "receive" in cmd and f"{layout.dir}/" in cmd]
    return sorted(pids)


def daemons(box: Sandbox) -> Dict[str, object]:
    """Which postmaster, sshd and cron loop serve *box*, and its backups."""
    layout = stack.layout(box.directory)
    return {"postmaster": (layout.pgdata / "postmaster.pid").read_text().split()[0],
            "sshd": stack.sshd_pid(layout), "cron loop": stack.cron_loop_pid(layout),
            "backups": sorted(p.name for p in (layout.barman_home / box["BARMAN_SERVER"] / "base").iterdir())}


@pytest.fixture(scope="module")
def other(sandbox):
    """A second sandbox, with the cron loop, on its own free ports."""
    box = sandbox_up("pgba-e2e-other-")
    try:
        yield box
    finally:
        if box.directory.exists():
            stack.down(box.directory, purge=True)


def test_up_records_its_ports_and_serves_on_them(other):
    recorded = stack.read_kv_file(other.directory / ".sandbox")
    assert recorded["PGPORT"] == other["PGPORT"] and recorded["SSH_PORT"] == other["SSH_PORT"]
    assert recorded["BARMAN_USER"] == other["BARMAN_USER"]
    assert other.psql(int(other["PGPORT"]), "SELECT count(*) FROM known_rows") == "100"
    assert listening(int(other["SSH_PORT"]))
    assert other["SSH_COMMAND"] == f"ssh -p {other['SSH_PORT']} postgres@127.0.0.1"
    assert stack.read_env(other.directory / "env") == other.env


def test_a_second_up_on_the_same_directory_rebuilds_and_duplicates_nothing(other):
    before, pids = daemons(other), long_lived(other)
    unix_home = Path(other["BARMAN_UNIX_HOME"])
    profile = (unix_home / ".profile").read_text()

    again = stack.up(other.directory)

    assert again == other.env
    assert daemons(other) == before
    assert long_lived(other) == pids
    assert before["cron loop"] is not None
    mine = set(running(other))
    commands = [cmd for pid, _, cmd in stack.processes() if pid in mine]
    assert sum("barman-cron-loop" in cmd for cmd in commands) == 1
    assert sum("pg_receivewal" in cmd for cmd in commands) == 1
    assert (unix_home / ".profile").read_text() == profile
    assert profile.count(stack.BLOCK_BEGIN) == 1
    host = f"[127.0.0.1]:{other['SSH_PORT']} "
    assert sum(line.startswith(host) for line in (unix_home / ".ssh" / "known_hosts").read_text().splitlines()) == 1


def test_a_different_port_on_an_existing_directory_is_refused(other):
    marker = (other.directory / ".sandbox").read_text()
    with pytest.raises(stack.SandboxError, match=rf"SANDBOX_PGPORT={other['PGPORT']}, not "):
        stack.up(other.directory, pg_port=free_port())
    refused = subprocess.run([str(ROOT / "scripts" / "sandbox"), "up", str(other.directory)],
                             env={"PATH": "/usr/bin:/bin", "SANDBOX_SSH_PORT": str(free_port())},
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert f"was built with SANDBOX_SSH_PORT={other['SSH_PORT']}, not " in refused.stderr
    assert (other.directory / ".sandbox").read_text() == marker
    assert other.psql(int(other["PGPORT"]), "SELECT 1") == "1"


def test_down_stops_only_the_processes_started_for_its_directory(other, sandbox):
    others, ours = running(other), long_lived(sandbox)
    assert others and len(ours) >= 5 and not set(others) & set(ours)  # receive-wal and pg_receivewal too

    stack.down(other.directory)

    assert running(other) == []
    assert not listening(int(other["PGPORT"])) and not listening(int(other["SSH_PORT"]))
    assert other.directory.is_dir()  # no --purge: the files stay
    assert set(ours) <= set(running(sandbox))
    assert long_lived(sandbox) == ours
    assert sandbox.psql(int(sandbox["PGPORT"]), "SELECT count(*) FROM known_rows WHERE id <= 100") == "100"
    assert listening(int(sandbox["SSH_PORT"]))


def test_down_purge_deletes_the_directory(other):
    down = subprocess.run([str(ROOT / "scripts" / "sandbox"), "down", str(other.directory), "--purge"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr
    assert not other.directory.exists()


def test_purge_refuses_a_directory_that_is_not_a_sandbox(tmp_path):
    (tmp_path / "precious").write_text("not a sandbox")
    with pytest.raises(stack.SandboxError, match="no .sandbox marker: not deleting it"):
        stack.down(tmp_path, purge=True)
    assert (tmp_path / "precious").exists()
