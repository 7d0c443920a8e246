"""Starting a detached worker, and what the worker does: run Barman, record how it ended."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from pg_backup_api.barman_io import commands as barman_cli
from pg_backup_api.core.errors import ApiError
from pg_backup_api.core.model import RECOVERY_OPTIONS, SLOT_LINE, WAITING_LINE, OperationType, State, now_utc, timestamp
from pg_backup_api.rules import ssh_command
from pg_backup_api.store.claims import Claims
from pg_backup_api.store.jobs import OperationStore
from pg_backup_api.worker import processes, ssh_master, target_probe

log = logging.getLogger(__name__)

# The worker subcommand of each type: the reference's names, and `run-backup` for backups
# (`backup` is the client command that asks the API for one).
WORKER_COMMANDS = {
    OperationType.RECOVERY: "recovery",
    OperationType.BACKUP: "run-backup",
    OperationType.CONFIG_SWITCH: "config-switch",
    OperationType.CONFIG_UPDATE: "config-update",
}


def spawn_worker(op_type: OperationType, server: str, op_id: str, store: OperationStore,
                 barman_conf: str) -> None:
    """Start `pg-backup-api <type> --server-name S --operation-id ID`, detached from this process.

    `setsid --fork` puts the worker in a session of its own (a Ctrl-C, a SIGTERM to the
    service's process group or a service restart does not reach it) and makes it a child
    of init rather than of this process, which therefore has no zombie to reap: it waits
    only for setsid itself, which returns at once.
    """
    where = ["--server-name", server] if server else []
    argv = ["setsid", "--fork", sys.executable, "-m", "pg_backup_api", WORKER_COMMANDS[op_type],
            *where, "--operation-id", op_id]
    env = {**os.environ, "PG_BACKUP_API_BARMAN_CONF": barman_conf,
           HOME_VARIABLE: str(store.root.parent if server else store.root),
           processes.MARKER_VARIABLE: operation_marker(server, op_id)}
    with open(store.log_path(op_id), "ab") as worker_log:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=worker_log, stderr=subprocess.STDOUT,
                       env=env, close_fds=True, check=True)


# The Barman home the service stored the job under, handed to the worker it spawns: the worker then
# needs neither Barman's configuration nor Barman's code (about 35 ms of imports) before barman starts.
HOME_VARIABLE = "PG_BACKUP_API_BARMAN_HOME"


def barman_home(barman_conf: str, server: Optional[str]) -> Path:
    """Where the operation files are: as the spawning service said, else (a worker run by hand) from
    Barman's configuration, which must then name *server*."""
    given = os.environ.get(HOME_VARIABLE)
    if given:
        return Path(given)
    from pg_backup_api.barman_io import adapter as barman_adapter  # here, not at the top: see HOME_VARIABLE

    config = barman_adapter.load_config(barman_conf)
    if server:
        config.server(server)
    return config.barman_home


# Seconds a waiting recovery sleeps at most between two asks for a slot on its host, when no slot
# file there was removed meanwhile: the first in the queue asks sooner, since a holder killed outright
# (its slot left behind) is found by whoever asks next. Any removal wakes every waiter at once.
FIRST_IN_QUEUE_RECHECK = 5.0
IN_QUEUE_RECHECK = 30.0
# After a signal that is not a cancel (a plain `kill`), how long the end waits for the operation's
# other processes; a cancel's own SIGKILL ends the wait sooner (see Worker.wait_for_the_rest).
STRAGGLERS_WAIT = 30.0


@dataclass(frozen=True)
class HostSlots:
    """The limit of recoveries running at once into one host (max_recoveries_per_host), and the
    claims that keep its slots (their liveness check is the service's reconciliation)."""

    claims: Claims
    limit: int


@contextmanager
def _woken_by_signals() -> Iterator[int]:
    """A file descriptor that becomes readable when a signal arrives, for the duration of the block.

    A signal handler returning normally does not end a select() (it is resumed, PEP 475): the
    interpreter's wake-up descriptor does, so a cancel ends a wait for a slot at once.
    """
    readable, writable = os.pipe()
    os.set_blocking(readable, False)
    os.set_blocking(writable, False)
    previous = signal.set_wakeup_fd(writable)
    try:
        yield readable
    finally:
        signal.set_wakeup_fd(previous)
        os.close(readable)
        os.close(writable)


def operation_marker(server: Optional[str], op_id: str) -> str:
    """What marks the processes of one operation (see processes.MARKER_VARIABLE)."""
    return f"{server or ''}/{op_id}"


class Worker:
    """Runs one stored operation to its recorded end."""

    def __init__(self, store: OperationStore, server: Optional[str], op_id: str) -> None:
        self.store = store
        self.op_id = op_id
        self.marker = operation_marker(server, op_id)
        self.child: Optional[subprocess.Popen] = None
        self.signalled: Optional[int] = None
        self.refused: Optional[str] = None  # why a last check before barman refused to start it
        # Installed before the worker records itself (here or in ssh_master, whichever is first):
        # from then on a cancel may signal it, and a signal must never be lost, whether barman
        # or the ssh master has started or not.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        # A cancel signals the whole process group; a plain `kill PID` reaches only this
        # process, so pass it on to barman and what it started: they must stop either way (one
        # holding barman's output open would keep this worker reading), and then the end is recorded.
        self.signalled = signum
        for pid in self._the_rest():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _the_rest(self) -> List[int]:
        """The operation's processes but this one (its group, the ssh master included)."""
        return [p for p in processes.group_members(os.getpgrp(), self.marker) if p != os.getpid()]

    def run(self, argv: List[str], last_check: Optional[Callable[[], Optional[str]]] = None
            ) -> Tuple[Optional[int], str]:
        """Run barman unless *last_check* (outside the lock: it may take an ssh round trip) says why not."""
        self.store.record_worker(self.op_id, processes.identity().to_json())
        self.refused = last_check() if last_check is not None else None
        if self.refused is not None:
            log.warning("operation %s: barman not started: %s", self.op_id, self.refused)
            return None, f"pg-backup-api: barman not started: {self.refused}\n"
        # Starting barman is decided under the operation's lock, which the service's "lost" and
        # "cancel" verdicts take too: whichever comes second sees the first.
        with self.store.operation_lock(self.op_id):
            refusal = self._refusal()
            if refusal is not None:
                log.warning("operation %s: barman not started: %s", self.op_id, refusal)
                return None, f"pg-backup-api: barman not started: {refusal}\n"
            log.info("operation %s: running %s", self.op_id, argv)
            try:
                self.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT,
                                              env={**os.environ, processes.MARKER_VARIABLE: self.marker})
            except OSError as exc:
                return 127, f"pg-backup-api: cannot run {argv[0]}: {exc.strerror}\n"
        if self.signalled is not None and self.child.poll() is None:
            # Arrived after the decision but before self.child was set: pass it on now.
            self.child.send_signal(self.signalled)
        output = []
        assert self.child.stdout is not None
        with open(self.store.progress_path(self.op_id), "ab") as progress:
            for line in self.child.stdout:
                output.append(line)
                progress.write(line)
                progress.flush()
        return self.child.wait(), b"".join(output).decode("utf-8", errors="replace")

    def wait_for_slot(self, slots: HostSlots, host: str) -> Tuple[bool, str]:
        """Wait, in arrival order, until one of *host*'s slots is this operation's: (True, what was
        said), or (False, ...) once it must not start at all (canceled, signalled or ended meanwhile)."""
        # Recorded first: a worker alive and waiting is neither lost nor unreachable by a cancel.
        self.store.record_worker(self.op_id, processes.identity().to_json())
        said = ""
        started = time.monotonic()
        waits = None
        with _woken_by_signals() as wake_fd:
            try:
                while self._refusal() is None:
                    place = slots.claims.take_slot(host, self.store.server, self.op_id, slots.limit)
                    if place is None:
                        if said:
                            said += self._say(f"{SLOT_LINE}{host} after {time.monotonic() - started:.1f} s\n")
                        return True, said
                    running, position = place
                    if not said:
                        said = self._say(f"{WAITING_LINE}{host} ({running} recoveries run there, at most "
                                         f"{slots.limit} at once: max_recoveries_per_host); number {position} in "
                                         "the queue\n")
                        log.info("operation %s: waiting for a slot on %s", self.op_id, host)
                    if waits is None:
                        # Watched from now on: ask once more, so that a slot freed before the watch is not missed.
                        waits = slots.claims.slot_waits(host)
                        continue
                    waits.wait(FIRST_IN_QUEUE_RECHECK if position == 1 else IN_QUEUE_RECHECK, wake_fd)
            finally:
                if waits is not None:
                    waits.close()
        return False, said

    def _say(self, line: str) -> str:
        """*line* in the progress file now (a status read shows it), and returned for the output."""
        with open(self.store.progress_path(self.op_id), "ab") as progress:
            progress.write(line.encode())
        return line

    def _refusal(self) -> Optional[str]:
        """Why barman must not start now, or None. A call of its own: pending signal handlers run
        on entering it, so a signal that arrived while the lock was awaited is seen here."""
        if self.signalled is not None:
            return f"the worker received {signal.Signals(self.signalled).name} before barman started"
        try:
            ended = self.store.read_output(self.op_id)
        except ApiError as exc:
            return f"the operation's output file cannot be read ({exc.message})"
        if ended is not None:
            return f"the operation had already ended (state {ended.get('state')}: {ended.get('reason', '')})"
        if self.store.cancel_requested(self.op_id):
            return "canceled before barman started"
        return None

    def wait_for_the_rest(self) -> None:
        """After a stop, record the end only once the operation's other processes are gone.

        A process that survives SIGKILL (stuck in uninterruptible I/O) still runs in the destination:
        the operation must stay unended, so its destination stays claimed and the service can say
        `cancel_failed`. During a cancel, the service's SIGKILL ends this wait by ending this
        process; after a plain signal the wait is bounded, and what still runs then is logged."""
        if self.signalled is None and not self.store.cancel_requested(self.op_id):
            return
        deadline = time.monotonic() + STRAGGLERS_WAIT
        while True:
            rest = self._the_rest()
            if not rest:
                return
            if time.monotonic() > deadline and not self.store.cancel_requested(self.op_id):
                log.error("operation %s: processes %s still run after its barman ended", self.op_id, rest)
                return
            time.sleep(0.1)

    def end_state(self, exit_code: Optional[int], output: str) -> Tuple[State, Optional[str]]:
        if self.store.cancel_requested(self.op_id):
            return State.CANCELED, "canceled on request"
        if exit_code == 0:
            return State.SUCCEEDED, None
        if self.signalled is not None:
            return State.FAILED, f"the worker received signal {signal.Signals(self.signalled).name}"
        if exit_code is None:
            return State.FAILED, self.refused or "barman did not run"
        if exit_code < 0:
            return State.FAILED, f"barman was killed by signal {signal.Signals(-exit_code).name}"
        why = f"barman exited with code {exit_code}"
        errors = barman_cli.errors_in(output)
        return State.FAILED, f"{why}: {'; '.join(errors)}" if errors else why


def _argv(op_type: OperationType, barman_conf: str, server: str, job: Dict[str, Any],
          copy_retry: Optional[Tuple[int, int]] = None) -> List[str]:
    if op_type is OperationType.RECOVERY:
        return barman_cli.restore_argv(
            barman_conf, server, job.get("resolved_backup_id") or job["backup_id"],
            job["destination_directory"], job["remote_ssh_command"],
            {k: job[k] for k in RECOVERY_OPTIONS if k in job}, copy_retry,
        )
    if op_type is OperationType.BACKUP:
        return barman_cli.backup_argv(barman_conf, server, job)
    if op_type is OperationType.CONFIG_SWITCH:
        return barman_cli.config_switch_argv(barman_conf, server, job)
    return barman_cli.config_update_argv(barman_conf, job["changes"])


def target_host(job: Dict[str, Any]) -> str:
    """The address a recovery's ssh connects to, what its slots are counted by: as the service recorded
    it, else (a job written without it) looked up as the service does."""
    if isinstance(job.get("target_address"), str):
        return job["target_address"]
    command = ssh_command.parse(job["remote_ssh_command"], ssh_command.ENABLEABLE)
    return ssh_command.connect_address(ssh_command.resolve(command))


def run_operation(op_type: OperationType, barman_conf: str, server: Optional[str], op_id: str,
                  slots: Optional[HostSlots] = None) -> int:
    """The worker process: run the operation a job file describes and always record its end.

    With *slots*, a recovery first waits for a slot on its target host.
    """
    store = None
    job: Dict[str, Any] = {}
    worker: Optional[Worker] = None
    output = ""
    exit_code = None
    queue = None
    unreachable = None
    try:
        home = barman_home(barman_conf, server)
        store = OperationStore(home / server if server else home, server)
        job = store.get(op_id).job
        worker = Worker(store, server, op_id)
        if op_type is OperationType.CONFIG_UPDATE:
            from pg_backup_api.barman_io import (
                adapter as barman_adapter,  # only this operation reads Barman's configuration
            )

            queue = barman_adapter.snapshot_config_changes_queue(barman_adapter.load_config(barman_conf))
        host = target_host(job) if slots is not None and op_type is OperationType.RECOVERY else None
        granted, waited = worker.wait_for_slot(slots, host) if slots and host else (True, "")
        try:
            if granted:
                # --- ssh multiplexing (ssh_master.py): Barman's ssh rides on one master connection of the
                # worker's for as long as Barman runs; the job file keeps the client's command.
                with ssh_master.multiplexed(op_type, job, home, server, op_id, store) as ssh:
                    argv = _argv(op_type, barman_conf, server or "", ssh.job, ssh.copy_retry)
                    # A queued recovery may start long after it was accepted: its staging directory again.
                    exit_code, output = worker.run(argv, lambda: target_probe.recheck_staging(ssh.job))
                    output = waited + ssh.note + output + ssh.afterwards()
                    unreachable = ssh.unreachable
                # --- end of ssh multiplexing
            else:  # barman does not start: run() says why, under the operation's lock
                exit_code, output = worker.run(_argv(op_type, barman_conf, server or "", job))
                output = waited + output
        finally:
            if slots and host:
                release_slot(slots, host, server, op_id)
    except ApiError as exc:
        output = f"pg-backup-api: {exc.message}\n"
    except Exception:  # the end must be recorded whatever went wrong
        output = f"pg-backup-api: the worker failed:\n{traceback.format_exc()}"
    if store is None:
        log.error("operation %s: cannot record its end: %s", op_id, output.strip())
        return 1
    if worker is not None:
        worker.wait_for_the_rest()
    state, reason = worker.end_state(exit_code, output) if worker else (State.FAILED, output.strip())
    if state is State.FAILED and unreachable and exit_code:
        reason = f"{reason}; the worker's ssh master could not connect either: {unreachable}"
    if queue is not None and state is not State.SUCCEEDED:
        output += restore_queue(queue)
    extra = {}
    if op_type is OperationType.BACKUP and state is State.SUCCEEDED:
        extra["new_backup_id"] = barman_cli.new_backup_id(output)
    return finish(store, op_id, job, exit_code, output, state, reason, extra)


def release_slot(slots: HostSlots, host: str, server: Optional[str], op_id: str) -> None:
    """Give the slot back; if that fails, the next recovery to ask frees it once this one has ended."""
    try:
        slots.claims.release_slot(host, server, op_id)
    except (OSError, ApiError) as exc:
        log.warning("operation %s: cannot give back its slot on %s: %s", op_id, host, exc)


def restore_queue(queue: Any) -> str:
    """A failed config_update must not leave its change at the head of Barman's queue, where it
    would fail every later `barman cron` and config-update: put the queue back as it was."""
    try:
        restored = queue.restore()
    except OSError as exc:
        log.error("cannot restore Barman's config change queue %s: %s", queue.path, exc)
        return (f"pg-backup-api: could not restore Barman's config change queue {queue.path} "
                f"({exc.strerror or exc}); see `pg-backup-api doctor`\n")
    if not restored:
        return ""
    log.warning("restored Barman's config change queue %s", queue.path)
    return "pg-backup-api: restored Barman's config change queue to its state before this operation\n"


def finish(store: OperationStore, op_id: str, job: Dict[str, Any], exit_code: Optional[int],
           output: str, state: State, reason: Optional[str], extra: Optional[Dict[str, Any]] = None) -> int:
    """Write the output file (the first end recorded wins); the worker's exit status."""
    if not store.job_path(op_id).exists():
        log.error("operation %s has no job file: nothing to record. %s", op_id, output.strip())
        return 1
    result: Dict[str, Any] = {
        **job,
        "success": state is State.SUCCEEDED,
        "end_time": timestamp(now_utc()),
        "output": output,
        "exit_code": exit_code,
        "state": state.value,
    }
    if reason:
        result["reason"] = reason
    result.update(extra or {})
    if not store.finish(op_id, result):
        log.warning("operation %s already had its end recorded", op_id)
    log.info("operation %s ended: %s (exit code %s)", op_id, state.value, exit_code)
    return 0 if state is State.SUCCEEDED else 1
