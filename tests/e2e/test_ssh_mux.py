"""ssh multiplexing on the real stack: one connection per recovery, nothing left behind, a fallback that recovers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pg_backup_api.worker import processes, ssh_master

from .conftest import free_port, wait_for

pytestmark = pytest.mark.e2e

# Slow enough (KB/s) that a cancel or a kill lands while rsync copies the ~60 MB cluster.
SLOW = 3000


def post_recovery(service, sandbox, destination, ssh_command=None, **options):
    body = {"type": "recovery", "backup_id": "latest", "destination_directory": destination,
            "remote_ssh_command": ssh_command or sandbox["SSH_COMMAND"], **options}
    response = service.post(f"/servers/{sandbox['BARMAN_SERVER']}/operations", json=body)
    assert response.status_code == 202, response.text
    return response.json()["operation_id"]


def worker_pid(sandbox, op_id) -> int:
    path = Path(sandbox["BARMAN_HOME"]) / sandbox["BARMAN_SERVER"] / "jobs" / ".workers" / f"{op_id}.worker"
    wait_for(path.exists)
    return json.loads(path.read_text())["pid"]


def socket_of(sandbox, op_id) -> Path:
    return ssh_master.socket_path(Path(sandbox["BARMAN_HOME"]), sandbox["BARMAN_SERVER"], op_id)


def masters() -> list:
    """Pids of every `ssh -M -N` running on the machine (ours carry ControlPath=<.ssh-mux>)."""
    out = subprocess.run(["pgrep", "-f", f"ssh -M -N -o ControlPath=.*/{ssh_master.MUX_DIR}/"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def masters_of(sock: Path) -> list:
    """The masters listening on *sock*: one operation's (other sandboxes may run masters meanwhile)."""
    found = []
    for pid in masters():
        try:
            if str(sock).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass  # ended meanwhile
    return found


def copying_data(pgid) -> bool:
    """True while an rsync of the group copies the base backup (Barman gives only that one --bwlimit)."""
    for pid in processes.group_members(pgid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"rsync") and any(a.startswith(b"--bwlimit") for a in argv):
            return True
    return False


def bytes_under(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def rsync_running(pgid) -> bool:
    for pid in processes.group_members(pgid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "rsync":
                return True
        except OSError:
            pass
    return False


class SshdLog:
    """Counts the connections sshd accepted on one port (LogLevel VERBOSE logs each)."""

    def __init__(self, path: Path, port: int) -> None:
        self.path, self.port = path, port
        self.offset = path.stat().st_size

    def connections(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read().decode("utf-8", "replace")
        return len(re.findall(rf"Connection from \S+ port \d+ on \S+ port {self.port}\b", text))


def restored_rows(sandbox, destination) -> str:
    with sandbox.copy(destination) as port:
        return sandbox.psql(port, sandbox["ROWS_QUERY"])


def test_a_multiplexed_recovery_restores_the_rows_over_one_ssh_connection(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    destination = sandbox.restore_dir("e2e-mux")
    sshd = SshdLog(Path(sandbox["LOG_DIR"]) / "sshd.log", int(sandbox["SSH_PORT"]))
    op_id = post_recovery(service, sandbox, destination)
    status = service.wait_until_ended(server, op_id)
    assert status["status"] == "DONE", status.get("output")
    assert status["output"].startswith("pg-backup-api: ssh multiplexed: one master connection to 127.0.0.1")
    # The status and the job keep the client's command; only Barman saw the rewritten one.
    assert status["remote_ssh_command"] == sandbox["SSH_COMMAND"]
    assert sshd.connections() == 2  # the service's look at the paths when it accepted it, then the master
    assert not socket_of(sandbox, op_id).exists()
    assert masters() == []
    assert restored_rows(sandbox, destination) == sandbox["ROWS_CHECK"]


def test_with_multiplexing_off_barman_opens_its_own_connections(sandbox):
    from .conftest import Service

    server = sandbox["BARMAN_SERVER"]
    off = Service(sandbox, {"PG_BACKUP_API_SSH_MULTIPLEX": "off"}).start()
    try:
        sshd = SshdLog(Path(sandbox["LOG_DIR"]) / "sshd.log", int(sandbox["SSH_PORT"]))
        op_id = post_recovery(off, sandbox, sandbox.restore_dir("e2e-mux-off"))
        status = off.wait_until_ended(server, op_id)
    finally:
        off.stop()
    assert status["status"] == "DONE", status.get("output")
    assert status["output"].startswith("pg-backup-api: ssh multiplexing is off")
    assert sshd.connections() > 10


def test_cancel_mid_copy_leaves_no_ssh_master_and_no_socket(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    op_id = post_recovery(service, sandbox, sandbox.restore_dir("e2e-mux-cancel"), bwlimit=SLOW)
    pid = worker_pid(sandbox, op_id)
    wait_for(lambda: rsync_running(pid), what="rsync copying")
    assert socket_of(sandbox, op_id).exists()
    assert len(masters()) == 1
    response = service.post(f"/servers/{server}/operations/{op_id}/cancel")
    assert (response.json()["status"], response.json()["state"]) == ("FAILED", "canceled")
    assert processes.group_members(pid) == []
    assert masters() == []
    assert not socket_of(sandbox, op_id).exists()


def test_a_master_never_outlives_its_worker(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    op_id = post_recovery(service, sandbox, sandbox.restore_dir("e2e-mux-orphan"), bwlimit=SLOW)
    pid = worker_pid(sandbox, op_id)
    wait_for(lambda: rsync_running(pid), what="rsync copying")
    os.kill(pid, signal.SIGKILL)  # the worker alone: the master learns it from the kernel
    wait_for(lambda: masters() == [], timeout=10, what="the master gone")
    assert not socket_of(sandbox, op_id).exists()
    status = service.get(f"/servers/{server}/operations/{op_id}").json()
    assert (status["status"], status["state"]) == ("FAILED", "lost")
    wait_for(lambda: processes.group_members(pid) == [], timeout=30)


def test_a_stale_socket_of_a_killed_worker_is_removed_by_the_next_reconciliation(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    op_id = post_recovery(service, sandbox, sandbox.restore_dir("e2e-mux-kill9"), bwlimit=SLOW)
    pid = worker_pid(sandbox, op_id)
    wait_for(lambda: rsync_running(pid), what="rsync copying")
    os.killpg(pid, signal.SIGKILL)  # worker, master, barman and rsync at once: nobody removes the socket
    wait_for(lambda: processes.group_members(pid) == [], timeout=10)
    sock = socket_of(sandbox, op_id)
    assert sock.is_socket()
    status = service.get(f"/servers/{server}/operations/{op_id}").json()
    assert (status["status"], status["state"]) == ("FAILED", "lost")
    assert not sock.exists()


@pytest.fixture
def sshd_max_sessions_1(sandbox):
    """A second sshd for the same target, with `MaxSessions 1`: ssh's session multiplexing refused."""
    directory = Path(sandbox["SANDBOX_DIR"]) / "sshd"
    port = free_port()
    config = directory / "sshd_config-maxsessions1"
    base = (directory / "sshd_config").read_text()
    config.write_text(re.sub(r"(?m)^(Port|PidFile) .*$", "", base)
                      + f"Port {port}\nPidFile {directory}/sshd-maxsessions1.pid\nMaxSessions 1\n")
    log = Path(sandbox["LOG_DIR"]) / "sshd-maxsessions1.log"
    subprocess.run(["/usr/sbin/sshd", "-f", str(config), "-E", str(log)], check=True)
    pid_file = directory / "sshd-maxsessions1.pid"
    wait_for(pid_file.exists, timeout=10)
    known_hosts = Path(sandbox["BARMAN_UNIX_HOME"]) / ".ssh" / "known_hosts"
    saved = known_hosts.read_text()
    key = (directory / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    known_hosts.write_text(saved + f"[127.0.0.1]:{port} {' '.join(key)}\n")
    try:
        yield port, log
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        known_hosts.write_text(saved)


def test_a_target_whose_sshd_refuses_multiplexing_still_recovers(sandbox, service, sshd_max_sessions_1):
    port, log = sshd_max_sessions_1
    server = sandbox["BARMAN_SERVER"]
    destination = sandbox.restore_dir("e2e-mux-maxsessions1")
    sshd = SshdLog(log, port)
    # Two rsync jobs at once: the master carries one session, the other one's ssh connects directly.
    op_id = post_recovery(service, sandbox, destination, f"ssh -p {port} postgres@127.0.0.1", jobs=2)
    status = service.wait_until_ended(server, op_id)
    assert status["status"] == "DONE", status.get("output")
    assert "ssh multiplexed" in status["output"]
    assert 1 <= sshd.connections()
    assert restored_rows(sandbox, destination) == sandbox["ROWS_CHECK"]


def test_a_master_that_cannot_start_falls_back_to_the_plain_command(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    mux_dir = ssh_master.socket_dir(Path(sandbox["BARMAN_HOME"]))
    mux_dir.mkdir(mode=0o700, exist_ok=True)
    owner = mux_dir.stat()
    os.chown(mux_dir, 0, 0)  # a directory the service user cannot use
    try:
        destination = sandbox.restore_dir("e2e-mux-fallback")
        op_id = post_recovery(service, sandbox, destination)
        status = service.wait_until_ended(server, op_id)
    finally:
        os.chown(mux_dir, owner.st_uid, owner.st_gid)
    assert status["status"] == "DONE", status.get("output")
    assert status["output"].startswith(f"pg-backup-api: ssh not multiplexed (cannot use {mux_dir}: ")
    assert "barman runs remote_ssh_command as sent" in status["output"]
    assert restored_rows(sandbox, destination) == sandbox["ROWS_CHECK"]
    assert masters() == []


def recovering_into(prefix: str) -> set:
    """The destinations under *prefix* that some process (barman, its ssh, rsync) names now."""
    found = set()
    pattern = re.compile(re.escape(prefix) + r"[0-9]+")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode("utf-8", "replace").replace("\0", " ")
            if "sh -s -- " not in argv:  # not the service's look at the paths before it accepts a recovery
                found.update(pattern.findall(argv))
        except OSError:
            continue  # ended meanwhile
    return found


def test_thirty_recoveries_posted_at_once_to_one_sshd_all_recover(sandbox):
    """sshd's default MaxStartups (10:30:100) drops a burst of connections; without multiplexing
    such a burst ends with most recoveries FAILED ('Unable to connect to the target host'). With
    max_recoveries_per_host (default 4), at most 4 run at once and the others wait, queued (as many
    as max_queued_per_host allows: 30 here, beyond the default 16)."""
    from .conftest import Service

    server = sandbox["BARMAN_SERVER"]
    service = Service(sandbox, {"PG_BACKUP_API_MAX_QUEUED_PER_HOST": "30"}).start()
    destinations = [sandbox.restore_dir(f"e2e-mux-burst-{i}") for i in range(30)]
    prefix = destinations[0][:-1]
    most, sampling = [0], threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            most[0] = max(most[0], len(recovering_into(prefix)))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(len(destinations)) as pool:
            ids = list(pool.map(lambda d: post_recovery(service, sandbox, d), destinations))
        ended = [service.wait_until_ended(server, op_id, timeout=900) for op_id in ids]
        sampling.set()
        sampler.join()
        failed = [s["output"][-500:] for s in ended if s["status"] != "DONE"]
        assert failed == []
        # Each used one connection, some after a retry: the output says which.
        assert all("ssh multiplexed" in s["output"] for s in ended)
        assert 2 <= most[0] <= 4, most[0]
        waited = [s for s in ended if "pg-backup-api: waiting for a slot on " in s["output"]]
        assert len(waited) >= 20  # the burst arrives within seconds, each recovery takes longer: most wait
        assert all("pg-backup-api: got a slot on " in s["output"] for s in waited)
    finally:
        sampling.set()
        service.stop()
        for destination in destinations:
            shutil.rmtree(destination, ignore_errors=True)


class SilentPort:
    """A TCP listener on 127.0.0.1 that relays its first *relayed* connections to the sandbox's sshd, then
    accepts every connection and never says a word (no ssh banner): a host that went silent after the
    service looked at its paths (POST), before the worker connects."""

    def __init__(self, sshd_port: int, relayed: int) -> None:
        self.sshd_port = sshd_port
        self.relayed = relayed
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.held: list = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn = self.listener.accept()[0]
            except OSError:
                return
            if self.relayed > 0:
                self.relayed -= 1
                upstream = socket.create_connection(("127.0.0.1", self.sshd_port))
                for source, sink in ((conn, upstream), (upstream, conn)):
                    threading.Thread(target=self.pipe, args=(source, sink), daemon=True).start()
            else:
                self.held.append(conn)

    @staticmethod
    def pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


def test_a_silent_ssh_port_fails_the_recovery_and_frees_its_slot(sandbox):
    """A port that accepts TCP but never speaks ssh used to hold a host slot until canceled, starving
    the recoveries queued behind it. ssh_connect_timeout bounds the worker's ssh (master and Barman's). A
    port silent from the start is refused at POST (the look at the target's paths times out)."""
    from .conftest import Service

    server = sandbox["BARMAN_SERVER"]
    # Two connections reach the sshd: the one recording its host key for this port, as an operator
    # would, and the service's look at the recovery's paths; the worker's then meet silence.
    silent = SilentPort(int(sandbox["SSH_PORT"]), relayed=2)
    recorded = subprocess.run(["runuser", "-u", sandbox["BARMAN_USER"], "--", "ssh", "-p", str(silent.port),
                               "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR",
                               "postgres@127.0.0.1", "true"], capture_output=True, text=True, timeout=60)
    assert recorded.returncode == 0, recorded.stderr
    bounded = Service(sandbox, {"PG_BACKUP_API_MAX_RECOVERIES_PER_HOST": "1",
                                "PG_BACKUP_API_SSH_CONNECT_TIMEOUT": "3"}).start()
    destination = sandbox.restore_dir("e2e-mux-after-silent")
    try:
        stuck = post_recovery(bounded, sandbox, sandbox.restore_dir("e2e-mux-silent"),
                              f"ssh -p {silent.port} postgres@127.0.0.1")
        wait_for(lambda: silent.held, what="the silent port connected to")
        after = post_recovery(bounded, sandbox, destination)  # the same host: it waits for the slot
        wait_for(lambda: bounded.get(f"/servers/{server}/operations/{after}").json()["state"] == "queued")
        failed = bounded.wait_until_ended(server, stuck, timeout=120)
        done = bounded.wait_until_ended(server, after)
        # Silent already when posted: the look at its paths times out, and nothing is stored.
        refused = bounded.post(f"/servers/{server}/operations", json={
            "type": "recovery", "backup_id": "latest", "destination_directory": sandbox.restore_dir("e2e-mux-mute"),
            "remote_ssh_command": f"ssh -p {silent.port} postgres@127.0.0.1"})
    finally:
        bounded.stop()
        silent.close()
    assert refused.status_code == 422, refused.text
    assert "timed out" in refused.json()["error"], refused.text
    assert (failed["status"], failed["state"]) == ("FAILED", "failed")
    assert "Connection timed out during banner exchange" in failed["output"]
    assert failed["reason"].startswith("barman exited with code 1: Unable to connect to the target host")
    assert "; the worker's ssh master could not connect either: " in failed["reason"]
    assert "Connection timed out during banner exchange" in failed["reason"]
    assert done["status"] == "DONE", done
    assert "pg-backup-api: got a slot on 127.0.0.1 after " in done["output"]
    assert restored_rows(sandbox, destination) == sandbox["ROWS_CHECK"]


def test_a_master_killed_mid_copy_does_not_fail_the_recovery(sandbox, service):
    """The README says a lost master makes a recovery slower, never broken; killing the master cut the
    rsync it carried and the recovery ended FAILED. Barman now retries the copy (--retry-times), whose
    ssh connects directly."""
    server = sandbox["BARMAN_SERVER"]
    destination = sandbox.restore_dir("e2e-mux-master-killed")
    op_id = post_recovery(service, sandbox, destination, bwlimit=SLOW)
    pid = worker_pid(sandbox, op_id)
    # The copy itself (the rsync given --bwlimit, not one listing a directory), a few MB into it.
    wait_for(lambda: copying_data(pid) and bytes_under(Path(destination)) > 4 * 2**20, what="the copy under way")
    sock = socket_of(sandbox, op_id)
    (master,) = masters_of(sock)
    assert master in processes.group_members(pid)  # the worker's own master, not another one
    os.kill(master, signal.SIGKILL)
    status = service.wait_until_ended(server, op_id)
    assert status["status"] == "DONE", status.get("output")
    assert ("pg-backup-api: the ssh master connection was killed by SIGKILL while barman ran: barman's later ssh "
            "and rsync connected directly, and a copy cut off with it is retried (--retry-times=2)") in status["output"]
    assert not sock.exists()
    assert masters_of(sock) == []
    assert restored_rows(sandbox, destination) == sandbox["ROWS_CHECK"]


def test_a_recovery_beyond_the_queue_bound_is_a_429_and_the_queued_one_still_recovers(sandbox):
    """The recovery queue had no bound: each waiting recovery is a process (60 queued used 0.78 cores
    and 1.6 GB). Beyond max_queued_per_host a POST is refused with Retry-After."""
    from .conftest import Service

    server = sandbox["BARMAN_SERVER"]
    bounded = Service(sandbox, {"PG_BACKUP_API_MAX_RECOVERIES_PER_HOST": "1",
                                "PG_BACKUP_API_MAX_QUEUED_PER_HOST": "1"}).start()
    running_into, queued_into = sandbox.restore_dir("e2e-queue-running"), sandbox.restore_dir("e2e-queue-waiting")
    try:
        running = post_recovery(bounded, sandbox, running_into, bwlimit=SLOW)
        queued = post_recovery(bounded, sandbox, queued_into)
        wait_for(lambda: bounded.get(f"/servers/{server}/operations/{queued}").json()["state"] == "queued")
        body = {"type": "recovery", "backup_id": "latest", "destination_directory": sandbox.restore_dir("e2e-queue-no"),
                "remote_ssh_command": sandbox["SSH_COMMAND"]}
        refused = bounded.post(f"/servers/{server}/operations", json=body)
        assert (refused.status_code, refused.headers.get("Retry-After")) == (429, "60"), refused.text
        assert "max_queued_per_host = 1" in refused.json()["error"]
        bounded.post(f"/servers/{server}/operations/{running}/cancel")
        done = bounded.wait_until_ended(server, queued)
    finally:
        bounded.stop()
        shutil.rmtree(running_into, ignore_errors=True)
    assert done["status"] == "DONE", done
    assert "pg-backup-api: got a slot on 127.0.0.1 after " in done["output"]
    assert restored_rows(sandbox, queued_into) == sandbox["ROWS_CHECK"]
    assert not Path(body["destination_directory"]).exists()
