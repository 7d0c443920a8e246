"""Starting a detached worker, and what the worker does: run Barman, record how it ended."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from typing import Any, Dict, List

from pg_backup_api import barman_adapter
from pg_backup_api.errors import ApiError
from pg_backup_api.operations import OperationType, now_utc, timestamp
from pg_backup_api.store import OperationStore

log = logging.getLogger(__name__)

WORKER_COMMANDS = {OperationType.RECOVERY: "recovery"}


def spawn_worker(op_type: OperationType, server: str, op_id: str, store: OperationStore,
                 barman_conf: str) -> None:
    """Start `pg-backup-api <type> --server-name S --operation-id ID`, detached from this process.

    `setsid --fork` puts the worker in a session of its own (a Ctrl-C, a SIGTERM to the
    service's process group or a service restart does not reach it) and makes it a child
    of init rather than of this process, which therefore has no zombie to reap: it waits
    only for setsid itself, which returns at once.
    """
    argv = ["setsid", "--fork", sys.executable, "-m", "pg_backup_api", WORKER_COMMANDS[op_type],
            "--server-name", server, "--operation-id", op_id]
    env = {**os.environ, "PG_BACKUP_API_BARMAN_CONF": barman_conf}
    with open(store.log_path(op_id), "ab") as worker_log:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=worker_log, stderr=subprocess.STDOUT,
                       env=env, close_fds=True, check=True)


def run_recovery(barman_conf: str, server: str, op_id: str) -> int:
    """The worker: run the recovery a job file describes and always record its end."""
    store = None
    job: Dict[str, Any] = {}
    output = ""
    exit_code = None
    try:
        config = barman_adapter.load_config(barman_conf)
        config.server(server)
        store = OperationStore(config.barman_home / server)
        job = store.get(op_id).job
        argv = barman_adapter.restore_argv(
            barman_conf, server, job.get("resolved_backup_id") or job["backup_id"],
            job["destination_directory"], job["remote_ssh_command"],
        )
        log.info("operation %s: running %s", op_id, argv)
        exit_code, output = _run(argv)
    except ApiError as exc:
        output = f"pg-backup-api: {exc.message}\n"
    except Exception:  # the end must be recorded whatever went wrong
        output = f"pg-backup-api: the worker failed:\n{traceback.format_exc()}"
    if store is None:
        log.error("operation %s: cannot record its end: %s", op_id, output.strip())
        return 1
    return _finish(store, op_id, job, exit_code, output)


def _run(argv: List[str]) -> "tuple[int, str]":
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, check=False)
    except OSError as exc:
        return 127, f"pg-backup-api: cannot run {argv[0]}: {exc.strerror}\n"
    return proc.returncode, proc.stdout.decode("utf-8", errors="replace")


def _finish(store: OperationStore, op_id: str, job: Dict[str, Any], exit_code: "int | None",
            output: str) -> int:
    if not store.job_path(op_id).exists():
        log.error("operation %s has no job file: nothing to record. %s", op_id, output.strip())
        return 1
    result: Dict[str, Any] = {
        **job,
        "success": exit_code == 0,
        "end_time": timestamp(now_utc()),
        "output": output,
        "exit_code": exit_code,
    }
    if not store.finish(op_id, result):
        log.warning("operation %s already had its end recorded", op_id)
    log.info("operation %s ended with exit code %s", op_id, exit_code)
    return 0 if exit_code == 0 else 1
