"""The syntax of a path on a target host: what the OpenAPI format `target-path` checks.

Where such a path may point is decided in effects.py, once the operation's every effect is known.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

from pg_backup_api.core.errors import InvalidRequest

SAFE_PATH = re.compile(r"/[A-Za-z0-9._/-]+")


def check_target_path(field: str, path: Any) -> None:
    """Absolute, normalised, safe characters only."""
    if not isinstance(path, str):
        raise InvalidRequest(f"field '{field}' must be a string, not {type(path).__name__}")
    if not SAFE_PATH.fullmatch(path):
        raise InvalidRequest(
            f"field '{field}' must be an absolute path of letters, digits and ._-/ only; got {path!r}")
    if posixpath.normpath(path) != path or path.startswith("//"):
        raise InvalidRequest(
            f"field '{field}' must be a normalised absolute path (no '..', '.', '//' or trailing '/'); "
            f"got {path!r}")
