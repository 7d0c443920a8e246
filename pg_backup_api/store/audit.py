"""The audit trail: one JSON line per mutating request, appended to a file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict

log = logging.getLogger(__name__)


def append(path: Path, entry: Dict[str, Any]) -> None:
    """Append *entry* as one line; O_APPEND keeps lines from concurrent writers whole."""
    line = (json.dumps(entry, sort_keys=False) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        # The request has already been served; losing its audit line must be loud, not fatal.
        log.error("cannot write the audit log %s: %s; entry: %s", path, exc, line.decode().strip())
