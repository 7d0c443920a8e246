"""At most one run of a slow Barman read (`check`, `status`, `diagnose`) per key at a time.

`barman check` connects to PostgreSQL and over ssh, and can take seconds; a client (or a
monitoring agent stuck in a loop) asking for it again and again must not pile up Barman
processes. Inside one service process, callers that arrive while a run is going wait for it
and share its result. Across processes (gunicorn workers, a second service), an flock on a
file per key decides: whoever cannot take it at once answers 429 with Retry-After.
"""

from __future__ import annotations

import fcntl
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, TypeVar

from pg_backup_api.core.errors import TooBusy

T = TypeVar("T")


@dataclass
class _Run:
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: Optional[BaseException] = None


class SingleFlight:
    """One run per key: shared by this process's callers, refused (429) to other processes'."""

    def __init__(self, lock_dir: Callable[[], Path], retry_after: int) -> None:
        # A callable: the lock directory lives in Barman's home, which a configuration reload may move.
        self._lock_dir = lock_dir
        self.retry_after = retry_after
        self._runs: Dict[str, _Run] = {}
        self._mutex = threading.Lock()

    def run(self, key: str, what: str, fn: Callable[[], T]) -> T:
        with self._mutex:
            running = self._runs.get(key)
            if running is None:
                mine = self._runs[key] = _Run()
        if running is not None:
            running.done.wait()
            if running.error is not None:
                raise running.error
            return running.result  # type: ignore[return-value]
        try:
            mine.result = self._run_locked(key, what, fn)
            return mine.result  # type: ignore[return-value]
        except BaseException as exc:
            mine.error = exc
            raise
        finally:
            with self._mutex:
                del self._runs[key]
            mine.done.set()

    def _run_locked(self, key: str, what: str, fn: Callable[[], T]) -> T:
        directory = self._lock_dir()
        directory.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        with open(directory / f"{name}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TooBusy(f"{what} is already running for another request; "
                              f"retry in {self.retry_after} s", self.retry_after) from None
            return fn()
