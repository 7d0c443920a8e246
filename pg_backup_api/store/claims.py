"""At most one running operation per key, and at most N recoveries per target host: decided under one lock.

Keys name what two operations must not do at once: recover into the same directory of the same
host, back up the same server. A claim is a file under `<barman_home>/jobs/.destinations/` naming
its operation; it is written before the operation's worker starts and is free again once that
operation has ended or is gone. The lock is an flock on a file beside the claims, so it holds
across threads, gunicorn workers, service instances and workers.

Recoveries into one host take slots: files under `<barman_home>/jobs/.hosts/<host>/`, one per
recovery that waits for a slot or holds one, written when the recovery is accepted. The first
`limit` of them in arrival order (by operation id) run; the others wait, as many as the queue's
bounds allow (beyond, a new recovery is refused). A slot whose operation has ended, or is gone,
is freed by the next recovery that asks for one. A waiting recovery sleeps until a slot file of its
host is removed (inotify), or a while has passed: a holder killed outright removes nothing.

Whether a holder still runs is the service's reconciliation (a claim held by a lost worker is
freed by settling that operation): it is passed in as *lookup*, so this module stays below it.
"""

from __future__ import annotations

import fcntl
import hashlib
import select
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from pg_backup_api.core import ids
from pg_backup_api.core.errors import ApiError, Conflict, CorruptState, NotFound, TooBusy
from pg_backup_api.core.model import State
from pg_backup_api.core.records import Record, read_state_file, storage_error, write_json_atomic
from pg_backup_api.store import watch

CLAIMS_DIR = ".destinations"
HOSTS_DIR = ".hosts"
SLOT_SUFFIX = ".slot"
LOCK_FILE = ".lock"
# The one key of every config_update: they run one at a time, whichever server they touch.
CONFIG_UPDATE_KEY = "config-update"
# Seconds a client refused because the queue is full is asked to wait: a queued recovery waits for
# another recovery to end, which takes minutes.
QUEUE_RETRY_AFTER = 60
# Without inotify, a waiting recovery looks at its host's slots this often.
UNWATCHED_RECHECK = 2.0

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

    # -- recoveries per host -------------------------------------------------------------------

    def host_dir(self, host: str) -> Path:
        return self._jobs_dir() / HOSTS_DIR / hashlib.sha256(host.encode()).hexdigest()[:32]

    def slot_path(self, host: str, server: Optional[str], op_id: str) -> Path:
        tag = hashlib.sha256((server or "").encode()).hexdigest()[:8]
        return self.host_dir(host) / f"{op_id}.{tag}{SLOT_SUFFIX}"

    def refuse_if_queue_full(self, host: str, limit: int, per_host: int, total: int) -> None:
        """TooBusy (429) if a recovery into *host* accepted now would wait for a slot while *per_host*
        recoveries wait for one there already, or *total* on all hosts together."""
        with self.locked():
            try:
                here = self._live_slots(self.host_dir(host))
                if len(here) < limit:
                    return  # it would start at once
                waiting = _queued(here, limit)
                if waiting >= per_host:
                    raise TooBusy(f"{waiting} recoveries wait for a slot on {host} already (max_queued_per_host = "
                                  f"{per_host}, with max_recoveries_per_host = {limit} running there); nothing was "
                                  f"stored: retry in {QUEUE_RETRY_AFTER} s", QUEUE_RETRY_AFTER)
                for directory in sorted((self._jobs_dir() / HOSTS_DIR).iterdir()):
                    if directory != self.host_dir(host):
                        waiting += _queued(self._live_slots(directory), limit)
            except OSError as exc:
                raise storage_error(exc, f"cannot count the recoveries waiting in {self._jobs_dir() / HOSTS_DIR}") \
                    from exc
            if waiting >= total:
                raise TooBusy(f"{waiting} recoveries wait for a slot already, on all hosts together (max_queued = "
                              f"{total}); nothing was stored: retry in {QUEUE_RETRY_AFTER} s", QUEUE_RETRY_AFTER)

    def enqueue(self, host: str, server: Optional[str], op_id: str) -> None:
        """Put the operation last in *host*'s queue, where its worker takes a slot: done when the recovery
        is accepted, so that the next one counts it."""
        with self.locked():
            mine = self.slot_path(host, server, op_id)
            try:
                mine.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(mine, _waiting(host, server, op_id), exclusive=True)
            except FileExistsError:
                return
            except OSError as exc:
                raise storage_error(exc, f"cannot queue for a slot on {host} in {mine.parent}") from exc

    def take_slot(self, host: str, server: Optional[str], op_id: str, limit: int) -> Optional[Tuple[int, int]]:
        """None once the operation holds one of *host*'s *limit* slots (it may start); else how many
        run there and its place among those waiting. The first call puts it in the queue."""
        with self.locked():
            mine = self.slot_path(host, server, op_id)
            try:
                mine.parent.mkdir(parents=True, exist_ok=True)
                slots = self._live_slots(mine.parent, mine)
                held = next((data for path, data in slots if path == mine), None)
                if held is None:
                    held = _waiting(host, server, op_id)
                    write_json_atomic(mine, held, exclusive=False)
                    slots.append((mine, held))
            except OSError as exc:
                raise storage_error(exc, f"cannot queue for a slot on {host} in {mine.parent}") from exc
            if held.get("running"):
                return None
            running = sum(1 for _, data in slots if data.get("running"))
            waiting = sorted((data for _, data in slots if not data.get("running")), key=_arrival)
            place = next(i for i, data in enumerate(waiting) if data is held)
            if place < limit - running:
                try:
                    write_json_atomic(mine, {**held, "running": True}, exclusive=False)
                except OSError as exc:
                    raise storage_error(exc, f"cannot take a slot on {host}") from exc
                return None
            return running, place - max(0, limit - running) + 1

    def release_slot(self, host: str, server: Optional[str], op_id: str) -> None:
        """Leave *host*'s queue or give back its slot."""
        with self.locked():
            self.slot_path(host, server, op_id).unlink(missing_ok=True)

    def slot_waits(self, host: str) -> "SlotWaits":
        """How a recovery waiting for a slot on *host* sleeps between two asks; open it once the host's
        directory exists (after the first take_slot), then ask again before the first wait."""
        return SlotWaits(self.host_dir(host))

    def _live_slots(self, directory: Path, mine: Optional[Path] = None) -> List[Tuple[Path, Dict[str, Any]]]:
        """The slots in *directory* (one host's) that wait or run, once those of ended or gone operations
        are removed; *mine* is the caller's own, not looked up.

        Fails closed, as claims do: a slot file that cannot be read, or whose operation cannot be
        checked, counts as running.
        """
        slots = []
        for path in sorted(directory.glob(f"*{SLOT_SUFFIX}")):
            try:
                data = read_state_file(path)
                if data is None:
                    continue  # released meanwhile
                server, op_id = data["server"], data["operation_id"]
                if not (server is None or isinstance(server, str)) or not isinstance(op_id, str):
                    raise CorruptState(str(path), "'server' or 'operation_id' is not a string")
            except (CorruptState, KeyError):
                slots.append((path, {"operation_id": "", "running": True}))
                continue
            if path != mine:
                try:
                    record = self._lookup(server, op_id)
                except NotFound:
                    path.unlink(missing_ok=True)
                    continue
                except ApiError:
                    slots.append((path, {**data, "running": True}))
                    continue
                if record.output is not None and record.problem is None:
                    path.unlink(missing_ok=True)  # ended: its slot is free
                    continue
            slots.append((path, data))
        return slots


def _queued(slots: List[Tuple[Path, Dict[str, Any]]], limit: int) -> int:
    """How many of one host's *slots* wait once the free slots are taken: a recovery just accepted, whose
    worker has not asked yet, is not counted as waiting while a slot is free for it."""
    running = sum(1 for _, data in slots if data.get("running"))
    return max(0, len(slots) - max(running, limit))


def _waiting(host: str, server: Optional[str], op_id: str) -> Dict[str, Any]:
    """A slot file's content while its recovery waits."""
    return {"server": server, "operation_id": op_id, "host": host, "running": False}


def _arrival(slot: Dict[str, Any]) -> Tuple[Any, str]:
    """Arrival order: by operation id (a time), then by server."""
    return ids.sort_key(slot["operation_id"]), slot.get("server") or ""


class SlotWaits:
    """Sleeps until a slot file of one host is removed (a slot given back or freed), a wake-up file
    descriptor is readable (the worker's signals) or a time has passed: no polling while nothing changes."""

    def __init__(self, directory: Path) -> None:
        self._watch = watch.open_watch(directory)

    def wait(self, timeout: float, wake_fd: int) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._watch is None or not self._watch.usable:
                select.select([wake_fd], [], [], min(remaining, UNWATCHED_RECHECK))
                return
            changes = self._watch.wait(remaining, wake_fd)
            # Nothing changed before the deadline: woken by *wake_fd*. New slots and rewritten ones free nothing.
            if changes is None or not (changes[0] or changes[1]) or any(n.endswith(SLOT_SUFFIX) for n in changes[1]):
                return

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
