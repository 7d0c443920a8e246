"""One ssh connection per operation: a master the worker starts, that every ssh and rsync of Barman rides on.

`barman restore` opens a new ssh connection for each check, mkdir, rsync pass and configuration
edit (about 30 for a small cluster), each paying a key exchange and an authentication, and a
burst of recoveries to one host trips sshd's MaxStartups. So the worker starts one master
connection of its own (`ssh -M -N`, the client's validated options and host), waits until it
carries a session, and hands Barman the client's command plus `-o ControlMaster=no
-o ControlPath=SOCKET`: every ssh Barman starts then opens a session on that one connection.

Nothing here may fail an operation: when the master cannot start or carry a session, Barman runs
the client's command as it is, and the operation's output says which path was taken. A mux
client whose master later refuses a session or vanishes makes a direct connection itself.

The socket is in `<barman_home>/.ssh-mux/` (mode 0700: only the service user can reach it), one
per operation. The master is a child in the worker's process group, carrying the operation's
marker, so a cancel stops it; it gets SIGTERM when the worker dies (PR_SET_PDEATHSIG), and a
socket left by a master killed with SIGKILL is removed by the next reconciliation (`sweep`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import random
import re
import signal
import socket
import stat
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from pg_backup_api.core.errors import ApiError
from pg_backup_api.rules import ssh_command
from pg_backup_api.rules.settings import Settings
from pg_backup_api.worker import processes

log = logging.getLogger(__name__)

MUX_DIR = ".ssh-mux"
# ssh binds the socket as PATH.<16 random characters> and then renames it, and a unix socket's
# path holds at most 107 bytes: so at most 107 - 17.
MAX_SOCKET_PATH = 90
# The socket path goes into the command /bin/sh runs and into ssh's ControlPath, which expands
# `%` and `~`: only characters neither treats specially.
SAFE_PATH = re.compile(r"/[A-Za-z0-9._/-]+")
START_TIMEOUT = 30.0  # seconds the master may take to connect and carry a first session
STOP_TIMEOUT = 5.0
POLL = 0.01
PR_SET_PDEATHSIG = 1
# A master that sshd drops before the key exchange (MaxStartups, or a restart), or whose connection
# is refused (sshd restarting, a host coming up), is retried after about these many seconds, each
# retry said in the operation's output; a failed authentication or an unknown host is not.
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)
RETRYABLE = re.compile(r"kex_exchange_identification|Connection reset by peer|Connection closed by remote host"
                       r"|Connection refused")
# The job field that holds each operation type's ssh command: the operations that go over ssh.
SSH_FIELDS = {"recovery": "remote_ssh_command"}


def socket_dir(barman_home: Path) -> Path:
    return Path(barman_home) / MUX_DIR


def socket_path(barman_home: Path, server: Optional[str], op_id: str) -> Path:
    """One name per operation: operation ids are unique per server, hence the server's tag."""
    tag = hashlib.sha256((server or "").encode()).hexdigest()[:6]
    return socket_dir(barman_home) / f"{op_id}.{tag}"


def mux_command(command: ssh_command.SshCommand, sock: Path) -> str:
    """The client's command with the two options that make it a client of the master at *sock*.

    Put first: ssh keeps the first value it reads of an option, so nothing later in the
    command or in ~/.ssh/config changes them.
    """
    return " ".join([command.argv[0], "-o", "ControlMaster=no", "-o", f"ControlPath={sock}",
                     *command.argv[1:]])


def master_argv(command: ssh_command.SshCommand, sock: Path) -> List[str]:
    # ControlPersist=no keeps `-M -N` in the foreground, a child of the worker; BatchMode=yes so that
    # it never waits for a password or a host key answer nobody gives.
    return [command.argv[0], "-M", "-N", "-o", f"ControlPath={sock}", "-o", "ControlPersist=no",
            "-o", "BatchMode=yes", *command.argv[1:]]


def check_argv(command: ssh_command.SshCommand, sock: Path) -> List[str]:
    return [command.argv[0], "-o", f"ControlPath={sock}", "-O", "check", *command.argv[1:]]


def probe_argv(command: ssh_command.SshCommand, sock: Path) -> List[str]:
    """A session through the master running `true`. A mux client whose session the master refuses
    (sshd's MaxSessions 0) silently connects directly instead: ProxyCommand=false makes that fail."""
    return [command.argv[0], "-o", "ControlMaster=no", "-o", f"ControlPath={sock}",
            "-o", "ProxyCommand=false", "-o", "BatchMode=yes", *command.argv[1:], "true"]


def prepare_dir(directory: Path) -> None:
    """Make *directory* 0700 and owned by this user, or raise OSError saying why it cannot be used."""
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise OSError(f"{directory} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)


def _answers(path: Path) -> bool:
    """True when a process listens on the unix socket *path* (a live master)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def sweep(barman_home: Path) -> List[str]:
    """Remove the sockets no master listens on any more (a master killed with SIGKILL); their names."""
    directory = socket_dir(barman_home)
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        try:
            if not stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode) or _answers(Path(entry.path)):
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(entry.name)
        log.warning("removed the stale ssh master socket %s", entry.path)
    return removed


def _die_with_parent() -> None:
    # In the child before exec: SIGTERM when the worker dies, even by SIGKILL, so that the master
    # never outlives it; ssh removes its socket on SIGTERM.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Master:
    """The master connection of one operation."""

    def __init__(self, command: ssh_command.SshCommand, sock: Path, env: Dict[str, str]) -> None:
        self.command = command
        self.sock = sock
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.stderr: Any = None
        self.retries: List[str] = []
        self.timeout = START_TIMEOUT
        self.unreachable = False  # the last start failed to connect (not a mux problem): a direct ssh fails too

    def start(self, timeout: float = START_TIMEOUT) -> Optional[str]:
        """Start the master and wait until it carries a session; None then, else why it is not used."""
        if len(str(self.sock)) > MAX_SOCKET_PATH:
            return f"the socket path {self.sock} is longer than {MAX_SOCKET_PATH} bytes"
        if not SAFE_PATH.fullmatch(str(self.sock)):
            return f"the socket path {self.sock} has characters other than letters, digits and ._-/"
        try:
            prepare_dir(self.sock.parent)
            if self.sock.exists() or self.sock.is_symlink():
                self.sock.unlink()  # this operation's own name: a leftover of nothing alive
        except OSError as exc:
            return f"cannot use {self.sock.parent}: {exc.strerror or exc}"
        self.timeout = timeout
        deadline = time.monotonic() + timeout
        for delay in (*RETRY_DELAYS, None):
            why = self._connect(deadline)
            if why is None:
                break
            if delay is None or not RETRYABLE.search(why) or time.monotonic() + delay > deadline:
                self.unreachable = True
                return why
            # sshd drops connections beyond MaxStartups during the key exchange: a burst of
            # recoveries to one host gets through when each comes back a little later.
            pause = delay * random.uniform(0.5, 1.5)
            self.retries.append(f"{why} (retried after {pause:.1f} s)")
            log.info("ssh master %s: %s; retrying in %.1f s", self.sock, why, pause)
            time.sleep(pause)
        for what, argv in (("ssh -O check", check_argv(self.command, self.sock)),
                           ("a session through it", probe_argv(self.command, self.sock))):
            try:
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      env=self.env, timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return f"{what} did not answer within {self.timeout:.0f} s"
            if done.returncode != 0:
                detail = " ".join(done.stderr.split())[:300] or f"exit code {done.returncode}"
                return f"the master connection is up but {what} failed: {detail}"
        return None

    def _connect(self, deadline: float) -> Optional[str]:
        """One attempt: the master runs and its socket exists (None), or why not."""
        self.stop()
        self.stderr = tempfile.TemporaryFile()
        parent = os.getpid()

        def child_setup() -> None:
            _die_with_parent()
            if os.getppid() != parent:  # the worker died before prctl: nobody would stop us
                os._exit(1)

        try:
            self.proc = subprocess.Popen(master_argv(self.command, self.sock), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=self.stderr, env=self.env,
                                         preexec_fn=child_setup)
        except OSError as exc:
            return f"cannot run {self.command.argv[0]}: {exc.strerror or exc}"
        while not self.sock.exists():
            if self.proc.poll() is not None:
                return f"the master connection exited with code {self.proc.returncode}: {self._errors()}"
            if time.monotonic() > deadline:
                return f"the master connection was not up within {self.timeout:.0f} s"
            time.sleep(POLL)
        return None

    def _errors(self) -> str:
        if self.stderr is None:
            return ""
        self.stderr.seek(0)
        return " ".join(self.stderr.read().decode("utf-8", "replace").split())[:300] or "no message"

    def stop(self) -> None:
        """SIGTERM (ssh then removes its socket), SIGKILL if it lingers; the socket is gone after."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            self.sock.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the ssh master socket %s: %s", self.sock, exc)
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None


@dataclass(frozen=True)
class Plan:
    """What the worker hands Barman: the job with its ssh command rewritten, or unchanged."""

    job: Dict[str, Any]
    note: str  # the line the operation's output starts with; empty for operations without ssh
    # `barman restore --retry-times/--retry-sleep`: a copy cut off with its connection is copied again.
    copy_retry: Optional[Tuple[int, int]] = None
    master: Optional["Master"] = None
    # Why the master could not connect, if that is why the ssh is not multiplexed: a failed operation's
    # reason says it too (Barman's own says only that it could not connect).
    unreachable: Optional[str] = None

    def afterwards(self) -> str:
        """For the output once barman has ended: how the master ended if it did while barman ran."""
        if self.master is None or self.master.proc is None or self.master.proc.poll() is None:
            return ""
        code = self.master.proc.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        copies = (f"a copy cut off with it is retried (--retry-times={self.copy_retry[0]})" if self.copy_retry
                  else "a copy cut off with it fails (copy_retry_times = 0)")
        return (f"pg-backup-api: the ssh master connection {how} while barman ran: barman's later ssh and rsync "
                f"connected directly, and {copies}\n")


def settings() -> Settings:
    """The service's settings as the service reads them (the worker inherits its environment)."""
    try:
        return Settings.from_env()
    except ValueError as exc:
        log.warning("cannot read the service settings (%s): the ssh settings keep their defaults", exc)
        return Settings()


def timeout_options(config: Settings) -> List[str]:
    """The `-o` options of ssh_connect_timeout and the keepalives: a port that accepts TCP but never
    speaks ssh, or a connection gone silent, ends the operation's ssh instead of holding its slot."""
    options = []
    if config.ssh_connect_timeout:
        options += ["-o", f"ConnectTimeout={config.ssh_connect_timeout}"]
    if config.ssh_server_alive_interval:
        options += ["-o", f"ServerAliveInterval={config.ssh_server_alive_interval}",
                    "-o", f"ServerAliveCountMax={config.ssh_server_alive_count_max}"]
    return options


def bounded(command: ssh_command.SshCommand, options: List[str]) -> ssh_command.SshCommand:
    """*command* with *options* first: ssh keeps the first value it reads, so the client's own
    ConnectTimeout or ServerAliveInterval cannot lift the service's."""
    return ssh_command.SshCommand((command.argv[0], *options, *command.argv[1:]), command.host)


@contextmanager
def multiplexed(op_type: str, job: Dict[str, Any], barman_home: Path, server: Optional[str], op_id: str,
                store: Any = None, config: Optional[Settings] = None) -> Iterator[Plan]:
    """For the duration of the block, the job Barman runs with (its ssh multiplexed when possible and
    bounded by the service's ssh timeouts), under the service's settings *config* (read when None).

    With the operation's *store*: the worker is recorded before the master starts, so that a cancel
    meanwhile stops the master with the rest of the group; nothing starts once a cancel is
    requested; and the plan's note goes to the progress file, so a status read while Barman runs shows it.
    """
    if store is not None:
        store.record_worker(op_id, processes.identity().to_json())
        if store.cancel_requested(op_id):
            yield Plan(job, "")
            return
    with _plan(op_type, job, barman_home, server, op_id, settings() if config is None else config) as plan:
        if plan.note and store is not None:
            with open(store.progress_path(op_id), "ab") as f:
                f.write(plan.note.encode())
        yield plan


@contextmanager
def _plan(op_type: str, job: Dict[str, Any], barman_home: Path, server: Optional[str], op_id: str,
          config: Settings) -> Iterator[Plan]:
    field = SSH_FIELDS.get(op_type)
    if field is None or not job.get(field):
        yield Plan(job, "")
        return
    retry = (config.copy_retry_times, config.copy_retry_sleep) if config.copy_retry_times else None
    try:
        # Validated at request time against the server's policy; parsed again for its tokens.
        command = ssh_command.parse(job[field], ssh_command.ENABLEABLE)
    except ApiError as exc:
        yield Plan(job, f"pg-backup-api: ssh not multiplexed ({exc.message}): barman runs {field} as sent\n", retry)
        return
    options = timeout_options(config)
    command = bounded(command, options)
    plain = {**job, field: " ".join(command.argv)}
    with_options = f" (with {' '.join(options)})" if options else ""
    if not config.ssh_multiplex:
        yield Plan(plain, f"pg-backup-api: ssh multiplexing is off (ssh_multiplex = off): barman opens its own ssh "
                          f"connections{with_options}\n", retry)
        return
    sock = socket_path(barman_home, server, op_id)
    master = Master(command, sock, {**os.environ, processes.MARKER_VARIABLE: f"{server or ''}/{op_id}"})
    try:
        started = time.monotonic()
        why = master.start()
        if why is None:
            log.info("operation %s: ssh master up in %.2f s on %s", op_id, time.monotonic() - started, sock)
            retried = "".join(f"pg-backup-api: ssh master: {r}\n" for r in master.retries)
            yield Plan({**job, field: mux_command(command, sock)},
                       f"{retried}pg-backup-api: ssh multiplexed: one master connection to {command.host} "
                       f"carries every ssh and rsync of barman (up in {time.monotonic() - started:.2f} s)\n",
                       retry, master)
        else:
            master.stop()
            log.warning("operation %s: ssh not multiplexed: %s", op_id, why)
            retried = "".join(f"pg-backup-api: ssh master: {r}\n" for r in master.retries)
            yield Plan(plain, f"{retried}pg-backup-api: ssh not multiplexed ({why}): barman runs {field} as "
                              f"sent{with_options}\n", retry, unreachable=why if master.unreachable else None)
    finally:
        master.stop()
