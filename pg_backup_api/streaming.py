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
from typing import Any, Callable, Iterator, Optional

from pg_backup_api.errors import TooBusy
from pg_backup_api.operations import describe
from pg_backup_api.store import OperationStore

POLL_SECONDS = 0.2
KEEPALIVE_SECONDS = 15.0
FOLLOW_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
RETRY_AFTER = 5


def event(data: str, name: Optional[str] = None) -> bytes:
    """One SSE event; a line of Barman's output never holds a newline, so one `data:` line."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {data}\n\n".encode("utf-8", errors="replace")


class StreamSlots:
    """At most *limit* streams at once in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def take(self) -> Callable[[], None]:
        if not self._slots.acquire(blocking=False):
            raise TooBusy(f"{self.limit} output streams are open already; retry later or poll the output "
                          "without follow", RETRY_AFTER)
        return self._slots.release


def follow(store: OperationStore, op_id: str, reconcile: Callable[[], Any], release: Callable[[], None],
           poll: float = POLL_SECONDS, keepalive: float = KEEPALIVE_SECONDS) -> Iterator[bytes]:
    """Events of the operation's output from its first line until it ends; *release* on leaving.

    *reconcile* returns the operation's record, turned `lost` if its worker died, so a stream
    of a dead worker ends too.
    """
    offset = 0
    partial = b""
    last_sent = time.monotonic()
    try:
        # A comment first, so the headers leave at once (through a proxy too), before any output.
        yield f": output of operation {op_id}\n\n".encode()
        while True:
            record = reconcile()
            # Read after the check: the worker writes its last line before the output file.
            chunk = _read_from(store, op_id, offset)
            offset += len(chunk)
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            if record.output is not None:
                if partial:
                    lines.append(partial)
                if offset == 0 and isinstance(record.output.get("output"), str):
                    # No progress file (an operation of the reference service): its recorded output.
                    lines = [line.encode() for line in record.output["output"].splitlines()]
            for line in lines:
                yield event(line.decode("utf-8", errors="replace").rstrip("\r"))
                last_sent = time.monotonic()
            if record.output is not None:
                yield event(json.dumps(describe(record), separators=(",", ":")), "status")
                return
            if time.monotonic() - last_sent >= keepalive:
                yield b": keepalive\n\n"
                last_sent = time.monotonic()
            time.sleep(poll)
    finally:
        release()


def _read_from(store: OperationStore, op_id: str, offset: int) -> bytes:
    try:
        with open(store.progress_path(op_id), "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""
