"""Starting a detached worker, and what the worker does: run Barman, record how it ended."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import traceback
from types import FrameType
from typing import Any, Dict, List, Optional, Tuple

from pg_backup_api import barman_adapter, processes, ssh_master
from pg_backup_api.errors import ApiError
from pg_backup_api.operations import RECOVERY_OPTIONS, OperationType, State, now_utc, timestamp
from pg_backup_api.store import OperationStore

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
           processes.MARKER_VARIABLE: operation_marker(server, op_id)}
    with open(store.log_path(op_id), "ab") as worker_log:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=worker_log, stderr=subprocess.STDOUT,
                       env=env, close_fds=True, check=True)


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
        # Installed before the worker records itself (here or in ssh_master, whichever is first):
        # from then on a cancel may signal it, and a signal must never be lost, whether barman
        # or the ssh master has started or not.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        # A cancel signals the whole process group; a plain `kill PID` reaches only this
        # process, so pass it on: barman must stop either way, and then the end is recorded.
        self.signalled = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self, argv: List[str]) -> Tuple[Optional[int], str]:
        self.store.record_worker(self.op_id, processes.identity().to_json())
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

    def end_state(self, exit_code: Optional[int]) -> Tuple[State, Optional[str]]:
        if self.store.cancel_requested(self.op_id):
            return State.CANCELED, "canceled on request"
        if exit_code == 0:
            return State.SUCCEEDED, None
        if self.signalled is not None:
            return State.FAILED, f"the worker received signal {signal.Signals(self.signalled).name}"
        if exit_code is None:
            return State.FAILED, "barman did not run"
        if exit_code < 0:
            return State.FAILED, f"barman was killed by signal {signal.Signals(-exit_code).name}"
        return State.FAILED, f"barman exited with code {exit_code}"


def _argv(op_type: OperationType, barman_conf: str, server: str, job: Dict[str, Any]) -> List[str]:
    if op_type is OperationType.RECOVERY:
        return barman_adapter.restore_argv(
            barman_conf, server, job.get("resolved_backup_id") or job["backup_id"],
            job["destination_directory"], job["remote_ssh_command"],
            {k: job[k] for k in RECOVERY_OPTIONS if k in job},
        )
    if op_type is OperationType.BACKUP:
        return barman_adapter.backup_argv(barman_conf, server, job)
    if op_type is OperationType.CONFIG_SWITCH:
        return barman_adapter.config_switch_argv(barman_conf, server, job)
    return barman_adapter.config_update_argv(barman_conf, job["changes"])


def run_operation(op_type: OperationType, barman_conf: str, server: Optional[str], op_id: str) -> int:
    """The worker process: run the operation a job file describes and always record its end."""
    store = None
    job: Dict[str, Any] = {}
    worker: Optional[Worker] = None
    output = ""
    exit_code = None
    queue = None
    try:
        config = barman_adapter.load_config(barman_conf)
        root = config.barman_home
        if server:
            config.server(server)
            root = root / server
        store = OperationStore(root, server)
        job = store.get(op_id).job
        worker = Worker(store, server, op_id)
        if op_type is OperationType.CONFIG_UPDATE:
            queue = barman_adapter.snapshot_config_changes_queue(config)
        # --- ssh multiplexing (ssh_master.py): Barman's ssh rides on one master connection of the
        # worker's for as long as Barman runs; the job file keeps the client's command.
        with ssh_master.multiplexed(op_type, job, config.barman_home, server, op_id, store) as ssh:
            argv = _argv(op_type, barman_conf, server or "", ssh.job)
            exit_code, output = worker.run(argv)
            output = ssh.note + output
        # --- end of ssh multiplexing
    except ApiError as exc:
        output = f"pg-backup-api: {exc.message}\n"
    except Exception:  # the end must be recorded whatever went wrong
        output = f"pg-backup-api: the worker failed:\n{traceback.format_exc()}"
    if store is None:
        log.error("operation %s: cannot record its end: %s", op_id, output.strip())
        return 1
    state, reason = worker.end_state(exit_code) if worker else (State.FAILED, output.strip())
    if queue is not None and state is not State.SUCCEEDED:
        output += restore_queue(queue)
    extra = {}
    if op_type is OperationType.BACKUP and state is State.SUCCEEDED:
        extra["new_backup_id"] = barman_adapter.new_backup_id(output)
    return finish(store, op_id, job, exit_code, output, state, reason, extra)


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
