"""GET .../operations/ID/output?follow=1: Barman's output as Server-Sent Events while it runs.

One `data:` event per line Barman prints, then one `event: status` whose data is the
operation's final status document; the stream ends there, or when the client goes. A
comment line every KEEPALIVE seconds lets a proxy and the server notice a client that left.
Each stream holds a thread for as long as it runs, so a process serves at most
`max_streams` at once and answers 429 beyond that.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable, Iterator, Optional

from pg_backup_api.core.errors import TooBusy
from pg_backup_api.core.model import LIVE_STATES, describe, state_of
from pg_backup_api.core.records import Record
from pg_backup_api.store.jobs import OperationStore

POLL_SECONDS = 0.2
KEEPALIVE_SECONDS = 15.0
FOLLOW_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
RETRY_AFTER = 5


def event(data: str, name: Optional[str] = None) -> bytes:
    """One SSE event: one `data:` line per line of *data*, split wherever `str.splitlines` splits.

    SSE ends a line at CR, LF or CRLF; splitting on every separator Python knows (VT, FF, FS, GS,
    RS, NEL, LS, PS too) leaves no line end inside a `data:` line, so no text can start a field.
    """
    head = f"event: {name}\n" if name else ""
    body = "".join(f"data: {piece}\n" for piece in data.splitlines() or [""])
    return f"{head}{body}\n".encode("utf-8", errors="replace")


class Slot:
    """One stream's place among StreamSlots; given back once, however often release() is called."""

    def __init__(self, slots: threading.BoundedSemaphore) -> None:
        self._slots = slots
        self._lock = threading.Lock()
        self._held = True
        # Set by the HTTP layer once the server owns the response (and so will close it).
        self.served = False

    def release(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        self._slots.release()


class StreamSlots:
    """At most *limit* streams at once in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def take(self) -> Slot:
        if not self._slots.acquire(blocking=False):
            raise TooBusy(f"{self.limit} output streams are open already; retry later or poll the output "
                          "without follow", RETRY_AFTER)
        return Slot(self._slots)


def follow(store: OperationStore, op_id: str, reconcile: Callable[[], Record],
           poll: float = POLL_SECONDS, keepalive: float = KEEPALIVE_SECONDS) -> Iterator[bytes]:
    """Events of the operation's output from its first line until it ends.

    *reconcile* returns the operation's record, turned `lost` if its worker died, so a stream
    of a dead worker ends too; a record that is `corrupt` has ended as well.
    """
    offset = 0
    partial = b""
    last_sent = time.monotonic()
    # A comment first, so the headers leave at once (through a proxy too), before any output.
    yield f": output of operation {op_id}\n\n".encode()
    while True:
        record = reconcile()
        ended = state_of(record) not in LIVE_STATES
        # Read after the check: the worker writes its last line before the output file.
        chunk = _read_from(store, op_id, offset)
        offset += len(chunk)
        # Whole lines only, cut after the last LF (a CR before it stays with it: CRLF is one line end).
        whole, newline, partial = (partial + chunk).rpartition(b"\n")
        text = (whole + newline).decode("utf-8", errors="replace")
        if ended:
            text += partial.decode("utf-8", errors="replace")
            if offset == 0 and record.output is not None and isinstance(record.output.get("output"), str):
                # No progress file (an operation of the reference service): its recorded output.
                text = record.output["output"]
        # One event per line as `str.splitlines` cuts the text: the stream's lines are the output's.
        for line in text.splitlines():
            yield event(line)
            last_sent = time.monotonic()
        if ended:
            yield event(json.dumps(describe(record), separators=(",", ":")), "status")
            return
        if time.monotonic() - last_sent >= keepalive:
            yield b": keepalive\n\n"
            last_sent = time.monotonic()
        time.sleep(poll)


def _read_from(store: OperationStore, op_id: str, offset: int) -> bytes:
    try:
        with open(store.progress_path(op_id), "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""
