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
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from pg_backup_api import ids
from pg_backup_api.errors import ApiError, CorruptState, NoSuchOperation

# Moved to the bottom layer (records); re-exported so the store's callers keep their imports.
from pg_backup_api.records import (  # noqa: F401
    Record,
    read_state_file,
    storage_error,
    write_json_atomic,
    write_json_new,
)

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

# A directory's mtime moves whenever an entry is added or removed, but only at the clock tick
# the file system uses (a few milliseconds): two changes within one tick share one mtime.
# So a cached listing is trusted only once its directory has been still for longer than that
# (on a network file system whose clock runs behind, keep the clocks in sync).
SETTLE_NS = 1_000_000_000


def _settled_stamp(directory: Path) -> Optional[int]:
    """The directory's mtime, or None if it is missing or changed too recently to trust."""
    try:
        mtime = os.stat(directory).st_mtime_ns
    except FileNotFoundError:
        return None
    return mtime if time.time_ns() - mtime > SETTLE_NS else None


class OperationStore:
    """The jobs/ and output/ folders of one Barman server, or of the Barman instance."""

    def __init__(self, root: Path, server: Optional[str] = None) -> None:
        self.root = root
        self.server = server  # None for the Barman instance's own operations
        self.jobs_dir = root / JOBS_DIR
        self.output_dir = root / OUTPUT_DIR
        self.workers_dir = self.jobs_dir / WORKERS_DIR
        # Job files are write-once, so a type parsed once is valid for as long as the
        # file exists: listing then reads only the files it has not seen before.
        self._types: Dict[str, str] = {}
        # Output files are write-once too: how an operation ended never changes.
        self._ends: Dict[str, Dict[str, Any]] = {}
        # The last listings of jobs/ and output/, valid while their directory is unchanged.
        self._listing: Tuple[Optional[int], List[Dict[str, str]]] = (None, [])
        self._ended: Tuple[Optional[int], frozenset] = (None, frozenset())
        self._pending: Tuple[Optional[list], Optional[frozenset], List[str]] = (None, None, [])
        self._lock = threading.Lock()

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
            job = found
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

    def unfinished(self, operations: Optional[List[Dict[str, str]]] = None) -> List[str]:
        """Ids that have a job file and no output file yet (of *operations*, a list() already made)."""
        listing = self.list() if operations is None else operations
        stamp = _settled_stamp(self.output_dir)
        cached_stamp, ended = self._ended
        if stamp is None or stamp != cached_stamp:
            try:
                ended = frozenset(n[:-5] for n in os.listdir(self.output_dir) if n.endswith(".json"))
            except FileNotFoundError:
                ended = frozenset()
            self._ended = (stamp, ended)
        cached_listing, cached_ended, pending = self._pending
        if cached_listing is not listing or cached_ended is not ended:
            pending = [o["id"] for o in listing if o["id"] not in ended]
            self._pending = (listing, ended, pending)
        return pending

    def remove(self, op_id: str) -> None:
        """Forget an operation: its job file first, so it never looks in progress meanwhile."""
        for path in [self.job_path(op_id), self.output_path(op_id),
                     *(self.workers_dir / f"{op_id}{suffix}" for suffix in SIDE_SUFFIXES)]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def end_summary(self, op_id: str) -> Optional[Dict[str, Any]]:
        """`success` and `state` of an ended operation (cached), None while it runs."""
        summary = self._ends.get(op_id)
        if summary is None:
            try:
                output = self.read_output(op_id)
            except CorruptState:
                return {"success": False, "state": "corrupt"}  # not cached: the operator may fix it
            if output is None:
                return None
            summary = {k: output[k] for k in ("success", "state") if k in output}
            self._ends[op_id] = summary
        return summary

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
        stamp = _settled_stamp(self.jobs_dir)
        cached_stamp, listing = self._listing
        if stamp is not None and stamp == cached_stamp:
            return listing
        try:
            names = os.listdir(self.jobs_dir)
        except FileNotFoundError:
            return []
        found = sorted((n[:-5] for n in names if n.endswith(".json") and ids.is_valid_id(n[:-5])),
                       key=ids.sort_key)
        with self._lock:
            known: Dict[str, str] = {}
            corrupt_ids = set()
            for op_id in found:
                op_type = self._types.get(op_id)
                if op_type is None:
                    try:
                        job = read_state_file(self.job_path(op_id))
                    except CorruptState as exc:
                        # Listed, so the client sees it; its status says `corrupt` and why.
                        log.error("operation %s is corrupt: %s", op_id, exc.message)
                        corrupt_ids.add(op_id)
                        known[op_id] = UNKNOWN_TYPE
                        continue
                    if job is None:
                        continue  # removed (pruned) since the directory was read
                    op_type = str(job.get("operation_type"))
                known[op_id] = op_type
            self._types = {i: t for i, t in known.items() if i not in corrupt_ids}
            listing = [{"id": i, "type": t, "state": "corrupt"} if i in corrupt_ids else {"id": i, "type": t}
                       for i, t in known.items()]
            # A corrupt file may be repaired in place, which leaves the directory's mtime alone.
            self._listing = (None if corrupt_ids else stamp, listing)
        return listing


UNKNOWN_TYPE = "unknown"


def corrupt(exc: CorruptState) -> Dict[str, str]:
    """The `problem` of a record whose files cannot be read."""
    return {"state": "corrupt", "reason": exc.message, "file": exc.path}
