"""Operation ids: a UTC timestamp like the reference's, with a suffix when the second is taken."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Iterator, Tuple

# The reference's ids are bare `%Y%m%dT%H%M%S`; ours add `-N` only on a collision, so a
# client that parses the timestamp part keeps working.
ID_PATTERN = r"[0-9]{8}T[0-9]{6}(?:-[0-9]{1,6})?"
ID_RE = re.compile(ID_PATTERN)
SUFFIX_RE = re.compile(r"[0-9]{1,6}")
MAX_SUFFIX = 999_999


def is_valid_id(op_id: Any) -> bool:
    return isinstance(op_id, str) and ID_RE.fullmatch(op_id) is not None


def candidates(now: datetime) -> Iterator[str]:
    """Yield the ids to try, in order, for an operation created at *now*."""
    base = now.strftime("%Y%m%dT%H%M%S")
    yield base
    for n in range(2, MAX_SUFFIX + 1):
        yield f"{base}-{n}"


def sort_key(op_id: str) -> Tuple[str, int]:
    """Chronological order: `T093201-10` comes after `T093201-9`."""
    base, _, suffix = op_id.partition("-")
    # ASCII digits only: str.isdigit() is true for "²", which int() refuses.
    return base, int(suffix) if SUFFIX_RE.fullmatch(suffix) else 0
