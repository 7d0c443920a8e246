"""At most one running operation per key: claims checked and written under one lock.

Keys name what two operations must not do at once: recover into the same directory of the same
host, back up the same server. A claim is a file under `<barman_home>/jobs/.destinations/` naming
its operation; it is written before the operation's worker starts and is free again once that
operation has ended or is gone. The lock is an flock on a file beside the claims, so it holds
across threads, gunicorn workers, service instances and workers.

Whether a holder still runs is the service's reconciliation (a claim held by a lost worker is
freed by settling that operation): it is passed in as *lookup*, so this module stays below it.
"""

from __future__ import annotations

import fcntl
import hashlib
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from pg_backup_api.errors import ApiError, Conflict, CorruptState, NotFound
from pg_backup_api.operations import State
from pg_backup_api.records import Record, read_state_file, storage_error, write_json_atomic

CLAIMS_DIR = ".destinations"
LOCK_FILE = ".lock"
# The one key of every config_update: they run one at a time, whichever server they touch.
CONFIG_UPDATE_KEY = "config-update"

# The operation (server or None, id) as reconciled now; NotFound once it or its server is gone.
Lookup = Callable[[Optional[str], str], Record]


class Claims:
    """The claims under `<jobs_dir()>/.destinations/`, *jobs_dir* being read at each use (the
    Barman configuration may be reloaded)."""

    def __init__(self, jobs_dir: Callable[[], Path], lookup: Lookup) -> None:
        self._jobs_dir = jobs_dir
        self._lookup = lookup
        # The flock is per open file: a thread that holds it must not open and lock it again.
        self._held = threading.local()

    @property
    def directory(self) -> Path:
        return self._jobs_dir() / CLAIMS_DIR

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The claims' lock, re-entrant within a thread: what is decided under it is decided once."""
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        directory = self.directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock = open(directory / LOCK_FILE, "a")
        except OSError as exc:
            raise storage_error(exc, f"cannot open the claims' lock in {directory}") from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0

    def path(self, key: str) -> Path:
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.claim"

    def refuse_if_held(self, key: str, busy: str) -> None:
        """Conflict naming the holder (or why the claim cannot be trusted) if *key* is held."""
        with self.locked():
            holder = self.holder(key)
        if holder is not None and holder.get("corrupt"):
            raise Conflict(f"refused until an operator checks the claim it needs: {holder['corrupt']}")
        if holder is not None:
            where = f" of server '{holder['server']}'" if holder.get("server") else ""
            raise Conflict(f"{busy}: operation '{holder['operation_id']}'{where}; wait for it or cancel it")

    def acquire(self, key: str, server: Optional[str], op_id: str, busy: str) -> None:
        """Claim *key* for the operation, checked and written under the lock; Conflict if it is held.

        The caller writes the claim before it starts the operation's worker.
        """
        with self.locked():
            self.refuse_if_held(key, busy)
            write_json_atomic(self.path(key), {"server": server, "operation_id": op_id, "key": key},
                              exclusive=False)

    def release(self, key: str, op_id: str) -> None:
        """Drop *key*'s claim if the operation *op_id* holds it (an ended holder frees it anyway)."""
        with self.locked():
            path = self.path(key)
            try:
                held = read_state_file(path)
            except CorruptState:
                return  # fails closed: an operator looks at it
            if held is not None and held.get("operation_id") == op_id:
                path.unlink(missing_ok=True)

    def holder(self, key: str) -> Optional[Dict[str, Any]]:
        """The claim of *key* if its operation still runs, else None.

        Fails closed: a claim that cannot be read, or whose operation's files cannot be, holds;
        it is then {"corrupt": why}. Only a claim whose operation or server is gone is free.
        """
        claim_path = self.path(key)
        try:
            holder = read_state_file(claim_path)
            if holder is None:
                return None
            server, op_id = holder["server"], holder["operation_id"]
            if not (server is None or isinstance(server, str)) or not isinstance(op_id, str):
                raise CorruptState(str(claim_path), "'server' or 'operation_id' is not a string")
        except CorruptState as exc:
            return {"corrupt": exc.message}
        except KeyError as exc:
            return {"corrupt": f"{claim_path} cannot be read: it has no {exc}; `pg-backup-api doctor` lists it "
                               "and `pg-backup-api doctor --fix` moves it aside"}
        try:
            record = self._lookup(server, op_id)
        except NotFound:
            return None  # its operation or server is gone
        except ApiError as exc:
            return {"corrupt": f"the operation '{op_id}' holding it cannot be checked: {exc.message}"}
        if record.problem is not None and record.problem["state"] == State.CORRUPT.value:
            return {"corrupt": f"operation '{op_id}' holds it and {record.problem['reason']}"}
        return holder if record.output is None else None

