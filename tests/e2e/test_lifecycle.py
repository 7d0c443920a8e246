"""Operations survive, stop and report truthfully on the real stack (PostgreSQL, Barman, sshd)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Optional

import pytest

from pg_backup_api.worker import processes

from .conftest import Service, unavailable, wait_for

pytestmark = pytest.mark.e2e

def post_recovery(service, sandbox, destination, ssh_command=None):
    body = {"type": "recovery", "backup_id": "latest", "destination_directory": destination,
            "remote_ssh_command": ssh_command or sandbox["SSH_COMMAND"]}
    return service.post(f"/servers/{sandbox['BARMAN_SERVER']}/operations", json=body)


def jobs_dir(sandbox) -> Path:
    return Path(sandbox["BARMAN_HOME"]) / sandbox["BARMAN_SERVER"] / "jobs"


def worker_pid(sandbox, op_id) -> int:
    path = jobs_dir(sandbox) / ".workers" / f"{op_id}.worker"
    wait_for(path.exists)
    return json.loads(path.read_text())["pid"]


def command_names(pids):
    names = []
    for pid in pids:
        try:
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:
            pass
    return names


def copying(pgid):
    """True once barman has started copying over ssh (an rsync or ssh process in the group)."""
    names = command_names(processes.group_members(pgid))
    return any(n in ("rsync", "ssh") for n in names)


def test_a_worker_killed_mid_recovery_is_failed_lost_on_the_next_get(sandbox, service):
    op_id = post_recovery(service, sandbox, sandbox.restore_dir("e2e-kill9")).json()["operation_id"]
    pid = worker_pid(sandbox, op_id)
    wait_for(lambda: copying(pid))
    ident = processes.identity(pid)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not processes.is_alive(ident), timeout=10)  # SIGKILL lands asynchronously
    status = service.get(f"/servers/{sandbox['BARMAN_SERVER']}/operations/{op_id}").json()
    assert (status["status"], status["state"]) == ("FAILED", "lost")
    assert f"pid {pid}" in status["reason"]
    wait_for(lambda: processes.group_members(pid) == [], timeout=30)


def test_cancel_mid_recovery_leaves_no_barman_rsync_or_ssh_behind(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    destination = sandbox.restore_dir("e2e-cancel")
    op_id = post_recovery(service, sandbox, destination).json()["operation_id"]
    pid = worker_pid(sandbox, op_id)
    wait_for(lambda: copying(pid))
    response = service.post(f"/servers/{server}/operations/{op_id}/cancel")
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["state"]) == ("FAILED", "canceled")
    assert processes.group_members(pid) == []
    leftovers = subprocess.run(["pgrep", "-af", destination], capture_output=True, text=True).stdout
    assert leftovers == ""
    again = service.post(f"/servers/{server}/operations/{op_id}/cancel")
    assert again.status_code == 409
    assert "already ended" in again.json()["error"]


class Freezer:
    """A cgroup v1 freezer group. A frozen process takes SIGKILL only once thawed: until then it is what
    a process stuck in uninterruptible I/O (a hung NFS mount, a dying disk) is to a cancel."""

    ROOT = Path("/sys/fs/cgroup/freezer")

    def __init__(self, name: str) -> None:
        if not (self.ROOT / "tasks").exists():
            unavailable(f"no cgroup v1 freezer at {self.ROOT}")
        self.path = self.ROOT / name
        self.path.mkdir(exist_ok=True)

    def freeze(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))
        (self.path / "freezer.state").write_text("FROZEN")
        wait_for(lambda: (self.path / "freezer.state").read_text().strip() == "FROZEN", timeout=10)

    def thaw(self) -> None:
        (self.path / "freezer.state").write_text("THAWED")

    def remove(self) -> None:
        self.thaw()
        wait_for(lambda: not (self.path / "cgroup.procs").read_text().strip(), timeout=10)
        self.path.rmdir()


def freeze_an_rsync(freezer: Freezer, pgid: int) -> Optional[int]:
    """An rsync of the operation, frozen while it runs (barman runs short ones too: one may end first)."""
    for pid in processes.group_members(pgid):
        if command_names([pid]) != ["rsync"]:
            continue
        try:
            freezer.freeze(pid)
        except OSError:  # it ended meanwhile
            continue
        try:
            if "State:\tD" in Path(f"/proc/{pid}/status").read_text():
                return pid
        except OSError:
            continue
    return None


def test_a_process_surviving_sigkill_makes_cancel_failed_and_keeps_the_claim_until_it_is_gone(sandbox):
    server = sandbox["BARMAN_SERVER"]
    service = Service(sandbox, {"PG_BACKUP_API_CANCEL_GRACE": "1"}).start()
    freezer = Freezer(f"pgba-e2e-{os.getpid()}")
    try:
        destination = sandbox.restore_dir("e2e-cancel-failed")
        body = {"type": "recovery", "backup_id": "latest", "destination_directory": destination,
                "remote_ssh_command": sandbox["SSH_COMMAND"], "bwlimit": 3000}  # about 15 s of copying
        op_id = service.post(f"/servers/{server}/operations", json=body).json()["operation_id"]
        pid = worker_pid(sandbox, op_id)
        rsync = wait_for(lambda: freeze_an_rsync(freezer, pid), what="an rsync of the recovery frozen")

        response = service.post(f"/servers/{server}/operations/{op_id}/cancel")
        assert response.status_code == 500, response.text
        assert f"processes {rsync} of operation '{op_id}' survived SIGKILL" in response.json()["error"]
        status = service.get(f"/servers/{server}/operations/{op_id}").json()
        assert (status["status"], status["state"]) == ("IN_PROGRESS", "cancel_failed")
        assert processes.group_members(pid) == [rsync]  # the rest of the operation is gone
        busy = post_recovery(service, sandbox, destination)  # the same host and destination
        assert busy.status_code == 409 and op_id in busy.json()["error"]

        freezer.thaw()  # the I/O returns: the pending SIGKILL lands
        wait_for(lambda: processes.group_members(pid) == [], timeout=10)
        status = service.get(f"/servers/{server}/operations/{op_id}").json()
        assert (status["status"], status["state"]) == ("FAILED", "canceled")
        assert service.post(f"/servers/{server}/operations/{op_id}/cancel").status_code == 409  # ended
        # The far side of the killed copy (rsync under sshd, not the operation's) ends once its
        # connection is gone; a new recovery into the same directory waits for that, as an operator would.
        wait_for(lambda: subprocess.run(["pgrep", "-f", destination], capture_output=True).returncode == 1,
                 what="no process left writing the destination")
        # Barman refuses a destination that is not empty (no data loss by accident), and the canceled
        # copy may have left part of a cluster there: the operator clears it, as Barman's error asks.
        shutil.rmtree(destination, ignore_errors=True)
        freed = post_recovery(service, sandbox, destination)
        assert freed.status_code == 202, freed.text
        status = service.wait_until_ended(server, freed.json()["operation_id"])
        assert status["status"] == "DONE", status.get("output")
    finally:
        freezer.remove()
        service.stop()


def test_a_second_recovery_into_the_same_destination_is_409_until_the_first_ends(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    destination = sandbox.restore_dir("e2e-busy")
    first = post_recovery(service, sandbox, destination).json()["operation_id"]
    second = post_recovery(service, sandbox, destination)
    assert second.status_code == 409
    assert first in second.json()["error"]
    elsewhere = post_recovery(service, sandbox, str(sandbox.holding_files("e2e-busy-other")))
    assert elsewhere.status_code == 202
    service.post(f"/servers/{server}/operations/{first}/cancel")
    # The canceled copy left files there: Barman refuses the next recovery at once.
    freed = post_recovery(service, sandbox, destination)
    assert freed.status_code == 202
    service.wait_until_ended(server, freed.json()["operation_id"])


def test_an_ipv4_mapped_spelling_of_a_busy_target_is_refused(sandbox, service):
    """`postgres@::ffff:127.0.0.1` reaches the sandbox's sshd on 127.0.0.1 as `postgres@127.0.0.1` does:
    it used to get a claim of its own, so two `rsync --delete` could run into one directory."""
    server, port = sandbox["BARMAN_SERVER"], sandbox["SSH_PORT"]
    mapped = f"ssh -p {port} postgres@::ffff:127.0.0.1"
    # The spelling really reaches the same sshd here; its host key is recorded for that spelling too, as
    # an operator would (the service looks at the target's paths over ssh before it claims).
    recording = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR"]
    reached = subprocess.run(["runuser", "-u", sandbox["BARMAN_USER"], "--", *mapped.split()[:-1], *recording,
                              mapped.split()[-1], "echo $SSH_CONNECTION"], capture_output=True, text=True, timeout=30)
    assert reached.stdout.split()[2:] == ["127.0.0.1", port], reached.stderr
    destination = sandbox.restore_dir("e2e-mapped")
    body = {"type": "recovery", "backup_id": "latest", "destination_directory": destination,
            "remote_ssh_command": sandbox["SSH_COMMAND"], "bwlimit": 3000}  # about 15 s of copying
    first = service.post(f"/servers/{server}/operations", json=body)
    assert first.status_code == 202, first.text
    op_id = first.json()["operation_id"]
    try:
        second = service.post(f"/servers/{server}/operations", json={**body, "remote_ssh_command": mapped})
        assert second.status_code == 409, second.text
        assert op_id in second.json()["error"] and f"on 127.0.0.1:{port}" in second.json()["error"]
        for host in ("0", "0.0.0.0", "::"):
            unspecified = service.post(f"/servers/{server}/operations", json={
                **body, "destination_directory": sandbox.restore_dir("e2e-unspecified"),
                "remote_ssh_command": f"ssh -p {port} postgres@{host}"})
            assert unspecified.status_code == 400, unspecified.text
            assert "field 'remote_ssh_command'" in unspecified.json()["error"]
            assert "unspecified address" in unspecified.json()["error"]
        unresolved = service.post(f"/servers/{server}/operations", json={
            **body, "remote_ssh_command": "ssh postgres@no-such-host.invalid"})
        assert unresolved.status_code == 422, unresolved.text
        assert "host 'no-such-host.invalid' does not resolve" in unresolved.json()["error"]
    finally:
        service.post(f"/servers/{server}/operations/{op_id}/cancel")
        shutil.rmtree(destination, ignore_errors=True)
    assert not Path(sandbox.restore_dir("e2e-unspecified")).exists()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_a_recovery_survives_a_restart_of_the_service(sandbox, stop_signal):
    server = sandbox["BARMAN_SERVER"]
    destination = sandbox.restore_dir(f"e2e-restart-{stop_signal.name.lower()}")
    first = Service(sandbox).start()
    try:
        op_id = post_recovery(first, sandbox, destination).json()["operation_id"]
        wait_for(lambda: copying(worker_pid(sandbox, op_id)))
    finally:
        first.stop(stop_signal)  # Ctrl-C on `serve` is a SIGINT to its process group
    assert first.proc.returncode is not None
    second = Service(sandbox).start()
    try:
        status = second.wait_until_ended(server, op_id)
    finally:
        second.stop()
    assert (status["status"], status["state"]) == ("DONE", "succeeded"), status.get("output")
    with sandbox.copy(destination) as port:
        assert sandbox.psql(port, sandbox["ROWS_QUERY"]) == sandbox["ROWS_CHECK"]


def test_no_zombie_is_left_after_twenty_operations(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    # Destinations that hold a file: Barman refuses each at once.
    ids = [post_recovery(service, sandbox, str(sandbox.holding_files(f"e2e-zombie-{i}"))).json()
           ["operation_id"] for i in range(20)]
    for op_id in ids:
        assert service.wait_until_ended(server, op_id)["status"] == "FAILED"
    service_pids = {service.proc.pid, *map(int, subprocess.run(
        ["pgrep", "-g", str(service.proc.pid)], capture_output=True, text=True).stdout.split())}
    table = subprocess.run(["ps", "-eo", "pid=,ppid=,stat="], capture_output=True, text=True).stdout
    zombies = [line for line in table.splitlines()
               if line.split()[2].startswith("Z") and int(line.split()[1]) in service_pids]
    assert zombies == []
    for op_id in ids:  # a worker exits right after recording its end
        pid = worker_pid(sandbox, op_id)
        wait_for(lambda pid=pid: processes.group_members(pid) == [], timeout=10)
