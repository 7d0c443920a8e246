"""The operation store: write-once JSON files under Barman's home, in the reference's layout.

    <barman_home>/<server>/jobs/<ID>.json     created when an operation is accepted
    <barman_home>/<server>/output/<ID>.json   created once, when the operation has ended
    <barman_home>/jobs|output/<ID>.json       the same for Barman-instance operations
    <barman_home>/<server>/jobs/.workers/     what the workers leave beside: logs, progress, identity

An operation's status follows from which files exist, so the files are the only state.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from pg_backup_api.core import ids
from pg_backup_api.core.errors import ApiError, CorruptState, NoSuchOperation
from pg_backup_api.core.model import parse_time

# Moved to the bottom layer (records); re-exported so the store's callers keep their imports.
from pg_backup_api.core.records import (  # noqa: F401
    Record,
    read_state_file,
    storage_error,
    write_json_atomic,
    write_json_new,
)
from pg_backup_api.store.index import OperationIndex

log = logging.getLogger(__name__)

JOBS_DIR = "jobs"
OUTPUT_DIR = "output"
# In a folder of their own, so that jobs/ changes (and its listing must be read again) only when
# an operation is created or removed, not each time a worker starts or ends; none ends in .json.
WORKERS_DIR = ".workers"
WORKER_LOG_SUFFIX = ".log"  # the worker's own log (its stderr)
PROGRESS_SUFFIX = ".out"  # what barman has printed so far
WORKER_SUFFIX = ".worker"  # who the worker is: pid, start time, boot id
CANCEL_SUFFIX = ".cancel"  # a cancellation was asked for
CANCEL_FAILED_SUFFIX = ".cancel-failed"  # processes survived SIGKILL: why, and which
SIDE_SUFFIXES = (WORKER_LOG_SUFFIX, PROGRESS_SUFFIX, WORKER_SUFFIX, CANCEL_SUFFIX, CANCEL_FAILED_SUFFIX)
# errno values that mean "the disk is full" (507) and "this file system cannot be written" (503).
class OperationStore:
    """The jobs/ and output/ folders of one Barman server, or of the Barman instance."""

    def __init__(self, root: Path, server: Optional[str] = None) -> None:
        self.root = root
        self.server = server  # None for the Barman instance's own operations
        self.jobs_dir = root / JOBS_DIR
        self.output_dir = root / OUTPUT_DIR
        self.workers_dir = self.jobs_dir / WORKERS_DIR
        # The only cache of what jobs/ and output/ hold; reading a single operation bypasses it.
        self.index = OperationIndex(self.jobs_dir, self.output_dir, read_state_file, read_job=read_job_file)

    def job_path(self, op_id: str) -> Path:
        return self.jobs_dir / f"{self._checked(op_id)}.json"

    def output_path(self, op_id: str) -> Path:
        return self.output_dir / f"{self._checked(op_id)}.json"

    def log_path(self, op_id: str) -> Path:
        return self.workers_dir / f"{self._checked(op_id)}{WORKER_LOG_SUFFIX}"

    def progress_path(self, op_id: str) -> Path:
        return self.workers_dir / f"{self._checked(op_id)}{PROGRESS_SUFFIX}"

    def worker_path(self, op_id: str) -> Path:
        return self.workers_dir / f"{self._checked(op_id)}{WORKER_SUFFIX}"

    def cancel_path(self, op_id: str) -> Path:
        return self.workers_dir / f"{self._checked(op_id)}{CANCEL_SUFFIX}"

    def cancel_failed_path(self, op_id: str) -> Path:
        return self.workers_dir / f"{self._checked(op_id)}{CANCEL_FAILED_SUFFIX}"

    @contextmanager
    def operation_lock(self, op_id: str) -> Iterator[None]:
        """The per-operation lock (an flock on its job file): the worker's "start barman now" and
        the service's "lost" and "cancel" verdicts are taken under it, so the second sees the first."""
        try:
            fd = os.open(self.job_path(op_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchOperation(op_id) from None
        except OSError as exc:
            raise CorruptState(str(self.job_path(op_id)), exc.strerror or str(exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _checked(op_id: str) -> str:
        if not ids.is_valid_id(op_id):
            raise NoSuchOperation(op_id)
        return op_id

    def ensure_dirs(self) -> None:
        try:
            self.workers_dir.mkdir(parents=True, exist_ok=True)
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, f"cannot create the operation folders under {self.root}") from exc

    def create(self, fields: Dict[str, Any], now: datetime) -> str:
        """Store a new job file and return its id; concurrent callers always get distinct ids."""
        self.ensure_dirs()
        try:
            path = write_json_new((self.job_path(op_id) for op_id in ids.candidates(now)), fields)
        except FileExistsError:
            raise ApiError("no free operation id left for this second") from None
        except OSError as exc:  # the temporary file is gone: no half-written job file is left
            raise storage_error(exc, f"cannot write a job file in {self.jobs_dir}") from exc
        return path.name[:-len(".json")]

    def get(self, op_id: str) -> Record:
        """The operation's files; one that cannot be read makes a record with a `corrupt` problem."""
        job: Dict[str, Any] = {}
        try:
            found = read_state_file(self.job_path(op_id))
            if found is None:
                raise NoSuchOperation(op_id)
            job = found  # kept when only a field is wrong: the status still shows what was asked
            check_job(self.job_path(op_id), job)
            return Record(op_id, job, self.read_output(op_id))
        except CorruptState as exc:
            log.error("operation %s is corrupt: %s", op_id, exc.message)
            return Record(op_id, job, None, corrupt(exc))

    def read_output(self, op_id: str) -> Optional[Dict[str, Any]]:
        return read_state_file(self.output_path(op_id))

    def record_worker(self, op_id: str, identity: Dict[str, Any]) -> None:
        self.workers_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.worker_path(op_id), identity, exclusive=False)

    def read_worker(self, op_id: str) -> Optional[Dict[str, Any]]:
        """The worker's identity as recorded; None before it records it; CorruptState if unreadable."""
        return read_state_file(self.worker_path(op_id))

    def record_cancel_failed(self, op_id: str, failure: Dict[str, Any]) -> None:
        write_json_atomic(self.cancel_failed_path(op_id), failure, exclusive=False)

    def cancel_failure(self, op_id: str) -> Optional[Dict[str, Any]]:
        """Why the last cancel could not stop the operation's processes, if it could not."""
        return read_state_file(self.cancel_failed_path(op_id))

    def request_cancel(self, op_id: str, request: Dict[str, Any]) -> None:
        self.workers_dir.mkdir(parents=True, exist_ok=True)  # none yet for a reference's job
        try:
            write_json_atomic(self.cancel_path(op_id), request, exclusive=True)
        except FileExistsError:
            pass  # asked twice: the first request stands

    def cancel_requested(self, op_id: str) -> bool:
        return self.cancel_path(op_id).exists()

    def read_progress(self, op_id: str, max_bytes: Optional[int] = None) -> str:
        """What barman printed so far; with *max_bytes*, only the end of it."""
        try:
            with open(self.progress_path(op_id), "rb") as f:
                if max_bytes is not None:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def unfinished(self) -> List[str]:
        """Ids that have a job file and no output file yet, oldest first. The caller must not change it."""
        return self.index.snapshot().pending

    def remove(self, op_id: str) -> None:
        """Forget an operation: its job file first, so it never looks in progress meanwhile."""
        for path in [self.job_path(op_id), self.output_path(op_id),
                     *(self.workers_dir / f"{op_id}{suffix}" for suffix in SIDE_SUFFIXES)]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def end_summary(self, op_id: str) -> Optional[Dict[str, Any]]:
        """`success` and `state` of an ended operation, None while it runs."""
        return self.index.end_summary(op_id)

    def finish(self, op_id: str, result: Dict[str, Any]) -> bool:
        """Record how the operation ended; False if an end was already recorded (the first wins)."""
        self.ensure_dirs()
        try:
            write_json_atomic(self.output_path(op_id), result, exclusive=True)
        except FileExistsError:
            return False
        return True

    def list(self) -> List[Dict[str, str]]:
        """[{"id", "type"}] of every operation, oldest first. The caller must not change it."""
        return self.index.snapshot().listing.operations()


def check_job(path: Path, job: Dict[str, Any]) -> None:
    """CorruptState unless *job* is a job file the service can act on: its `start_time` is what tells a
    worker that never started (lost after a grace) from one about to, so without it the operation would
    read as running for ever."""
    if parse_time(job.get("start_time")) is None:
        shown = repr(job["start_time"])[:80] if "start_time" in job else "missing"
        raise CorruptState(str(path), f"field 'start_time' is not an ISO-8601 time ({shown})")


def read_job_file(path: Path) -> Optional[Dict[str, Any]]:
    """A job file's JSON object; None when it does not exist; CorruptState when it cannot be read or
    makes no sense (see check_job)."""
    job = read_state_file(path)
    if job is not None:
        check_job(path, job)
    return job


def corrupt(exc: CorruptState) -> Dict[str, str]:
    """The `problem` of a record whose files cannot be read."""
    return {"state": "corrupt", "reason": exc.message, "file": exc.path}
