"""The shipped unit under a real systemd running as PID 1: in a container booted with systemd-nspawn
from this machine's own /usr (an empty, volatile root: no other service is enabled in it), sharing
the host's network, so the service reaches the sandbox's sshd and the tests reach the service.

What only a real systemd shows: `systemctl start` returns once gunicorn says READY (Type=notify),
the unit's hardening (ProtectSystem=strict, PrivateTmp=, NoNewPrivileges=, UMask=) lets a recovery
through, and `systemctl restart` (KillMode=process) leaves a running recovery alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Iterator, List

import pytest
import requests

from .conftest import ROOT, VENV, Sandbox, free_port, render, sandbox_down, sandbox_up, unavailable, wait_for
from .test_deployment import assert_rows_restored, copying, post_recovery, wait_until_ended, worker_of

pytestmark = pytest.mark.e2e

UNIT = ROOT / "packaging" / "pg-backup-api.service"
GUNICORN_CONF = ROOT / "packaging" / "gunicorn.conf.py"


class Machine:
    """A container whose PID 1 is systemd; commands run in it through nsenter."""

    def __init__(self, proc: subprocess.Popen, leader: int, log: Path, port: int) -> None:
        self.proc, self.leader, self.log, self.port = proc, leader, log, port
        self.url = f"http://127.0.0.1:{port}"

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", *argv], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def systemctl(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("systemctl", *args)

    def show(self, prop: str) -> str:
        return self.systemctl("show", "-P", prop, "pg-backup-api.service").stdout.strip()

    def journal(self) -> str:
        return self.run("journalctl", "--no-pager", "-u", "pg-backup-api.service").stdout


def host_pid(machine: Machine, pid: int) -> int:
    """The host's pid of the container's process *pid* (the worker records the pid it sees); 0 if gone."""
    namespace = Path(f"/proc/{machine.leader}/ns/pid").readlink()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "ns" / "pid").readlink() != namespace:
                continue
            nspid = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if int(nspid.split()[-1]) == pid:
            return int(entry.name)
    return 0


def systemd_leader(nspawn: int) -> int:
    """The container's PID 1, as the host sees it: systemd, the child of systemd-nspawn."""
    for child in Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split():
        if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
            return int(child)
    return 0


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """A sandbox of its own, where Barman's home would be (/var/lib), for a user of its own.

    Not under /tmp: the unit's PrivateTmp= gives the service a /tmp of its own, which systemd deletes
    on a stop; a Barman home bound into it would vanish under a recovery that outlives a restart."""
    if os.geteuid() != 0:
        unavailable("the sandbox creates users and runs services: run the tests as root")
    box = sandbox_up("pgba-e2e-systemd-", parent="/var/lib", barman_user="pgba-systemd")
    try:
        yield box
    finally:
        sandbox_down(box.directory)


@pytest.fixture(scope="module")
def machine(sandbox, tmp_path_factory) -> Iterator[Machine]:
    for program in ("systemd-nspawn", "nsenter"):
        if shutil.which(program) is None:
            unavailable(f"{program} is missing (scripts/bootstrap installs systemd-container)")
    if not (VENV / "bin" / "gunicorn").exists():
        unavailable(f"{VENV}/bin/gunicorn is missing")
    work = tmp_path_factory.mktemp("systemd")
    port = free_port()
    user = sandbox["BARMAN_USER"]
    homes: List[str] = sorted({sandbox["BARMAN_HOME"], sandbox["BARMAN_UNIX_HOME"]})
    # The unit as shipped, with the sandbox's user and Barman home in place of barman and /var/lib/barman.
    unit = work / "pg-backup-api.service"
    # The venv under test (PGBA_VENV) when it is not the unit's; /opt is bound into the container.
    venv = {"ExecStart=/opt/pg-backup-api/venv/bin/gunicorn ": f"ExecStart={VENV}/bin/gunicorn "}
    unit.write_text(render(UNIT, {"User=barman\n": f"User={user}\n", "Group=barman\n": f"Group={user}\n",
                                  "ReadWritePaths=/var/lib/barman -/var/log/barman":
                                      f"ReadWritePaths={' '.join(homes)} -{sandbox['LOG_DIR']}",
                                  **(venv if VENV != Path("/opt/pg-backup-api/venv") else {})}))
    default = work / "default"
    default.write_text(f"PG_BACKUP_API_BARMAN_CONF={sandbox['BARMAN_CONF']}\nPG_BACKUP_API_BIND=127.0.0.1:{port}\n")
    log = work / "nspawn.log"
    argv = ["systemd-nspawn", "--directory=/", "--volatile=yes", "--register=no", "--keep-unit", "--quiet",
            "--bind-ro=/etc/passwd", "--bind-ro=/etc/group", "--bind-ro=/opt",  # the user, the venv
            f"--bind={sandbox.directory}",
            *(f"--bind={h}" for h in homes if not Path(h).is_relative_to(sandbox.directory)),
            f"--bind-ro={unit}:/etc/systemd/system/pg-backup-api.service",
            f"--bind-ro={GUNICORN_CONF}:/etc/pg-backup-api/gunicorn.conf.py",
            f"--bind-ro={default}:/etc/default/pg-backup-api",
            "--boot", "--", "systemd.firstboot=off"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        leader = wait_for(lambda: proc.poll() is None and systemd_leader(proc.pid), timeout=30,
                          what=f"systemd-nspawn boots systemd ({log})")
        box = Machine(proc, leader, log, port)
        # `degraded`: some of the container's own units fail (no udev, no network set up): not ours.
        wait_for(lambda: box.systemctl("is-system-running").stdout.strip() in ("running", "degraded"),
                 timeout=60, interval=0.5, what="systemd reaches its default target")
        yield box
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_systemctl_start_returns_once_the_service_answers(machine):
    started = machine.systemctl("start", "pg-backup-api.service")
    assert started.returncode == 0, started.stderr + machine.journal()
    # Type=notify: no polling needed, the first request after `start` is served.
    assert requests.get(f"{machine.url}/status", timeout=10).json() == "OK"
    assert machine.show("ActiveState") == "active" and machine.show("SubState") == "running"
    main = host_pid(machine, int(machine.show("MainPID")))
    assert Path(f"/proc/{main}/comm").read_text().strip().startswith("gunicorn")
    status = Path(f"/proc/{main}/status").read_text()
    assert "NoNewPrivs:\t1" in status
    assert "Umask:\t0027" in status


def test_a_recovery_under_the_units_hardening_restores_the_rows(sandbox, machine):
    machine.systemctl("start", "pg-backup-api.service")
    destination = sandbox.restore_dir("systemd-recovery")
    response = post_recovery(machine.url, sandbox, destination)
    assert response.status_code == 202, response.text
    status = wait_until_ended(machine.url, sandbox, response.json()["operation_id"])
    assert status["status"] == "DONE", status.get("output", "") + machine.journal()
    assert_rows_restored(sandbox, destination)
    # ProtectSystem=strict: the service sees / and /usr read-only, even as it writes Barman's home.
    main = host_pid(machine, int(machine.show("MainPID")))
    mounts = Path(f"/proc/{main}/mountinfo").read_text().splitlines()
    for path in ("/", "/usr"):
        mounted = [line.split() for line in mounts if line.split()[4] == path]
        assert mounted and "ro" in mounted[-1][5].split(","), (path, mounted)


def test_systemctl_restart_leaves_a_running_recovery_alone(sandbox, machine):
    machine.systemctl("start", "pg-backup-api.service")
    destination = sandbox.restore_dir("systemd-restart")
    response = post_recovery(machine.url, sandbox, destination, bwlimit=3000)  # a copy of about 15 s
    assert response.status_code == 202, response.text
    op_id = response.json()["operation_id"]
    worker = wait_for(lambda: host_pid(machine, worker_of(sandbox, op_id)), what="the worker, seen from the host")
    wait_for(lambda: copying(worker), what="barman copies over ssh")
    before = int(machine.show("MainPID"))
    restarted = machine.systemctl("restart", "pg-backup-api.service")
    assert restarted.returncode == 0, restarted.stderr + machine.journal()
    assert int(machine.show("MainPID")) != before
    assert Path(f"/proc/{worker}").exists(), "KillMode=process: the recovery's worker must outlive the restart"
    assert requests.get(f"{machine.url}/status", timeout=10).json() == "OK"
    status = wait_until_ended(machine.url, sandbox, op_id)
    log = Path(sandbox["BARMAN_HOME"]) / sandbox["BARMAN_SERVER"] / "jobs" / ".workers" / f"{op_id}.log"
    assert status["status"] == "DONE", f"{status}\n{log.read_text()}\n{machine.journal()}"
    assert_rows_restored(sandbox, destination)
    # The stop is logged by systemd as leaving the worker running, not as a failure of the unit.
    assert machine.show("Result") == "success"
