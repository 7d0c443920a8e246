"""The query of a listing of operations: `status`, `type`, and the pages of `after` and `limit`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from pg_backup_api.core.errors import InvalidRequest
from pg_backup_api.core.ids import is_valid_id, sort_key
from pg_backup_api.core.model import OperationType, status_of
from pg_backup_api.core.records import Record
from pg_backup_api.store.jobs import OperationStore

LIST_STATUSES = ("IN_PROGRESS", "DONE", "FAILED")
LIST_TYPES = tuple(t.value for t in OperationType)
MAX_LIMIT = 10000
# ASCII digits only (str.isdigit() is true for "²", which int() refuses), and few enough
# of them that int() never meets a 5,000-digit string.
LIMIT_RE = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class ListFilters:
    """The list's query parameters, checked."""

    status: Optional[str] = None
    type: Optional[str] = None
    after: Optional[str] = None
    limit: Optional[int] = None


def parse_filters(query: Mapping[str, Any]) -> ListFilters:
    """Check the query parameters of a listing; every refusal names the parameter and its rule."""
    # A name is quoted back shortened: the query string may be kilobytes long.
    unknown = sorted(repr(name)[:80] for name in query if name not in ListFilters.__dataclass_fields__)
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s): {', '.join(unknown)}; "
                             f"allowed: {', '.join(ListFilters.__dataclass_fields__)}")
    for name, value in query.items():
        if not isinstance(value, str):
            raise InvalidRequest(f"query parameter '{name}' must be a string")
    status, op_type, after, limit = (query.get(name) for name in ("status", "type", "after", "limit"))
    if status is not None and status not in LIST_STATUSES:
        raise InvalidRequest(f"query parameter 'status' must be one of {', '.join(LIST_STATUSES)}")
    if op_type is not None and op_type not in LIST_TYPES:
        raise InvalidRequest(f"query parameter 'type' must be one of {', '.join(LIST_TYPES)}")
    if after is not None and not is_valid_id(after):
        raise InvalidRequest("query parameter 'after' must be an operation id such as 20261127T093201 "
                             "or 20261127T093201-2 (the 'next' of the previous page)")
    if limit is not None and (not LIMIT_RE.fullmatch(limit) or not 1 <= int(limit) <= MAX_LIMIT):
        raise InvalidRequest(f"query parameter 'limit' must be an integer from 1 to {MAX_LIMIT} "
                             f"in ASCII digits")
    return ListFilters(status, op_type, after, int(limit) if limit is not None else None)


def paged(store: OperationStore, operations: List[Dict[str, str]], filters: ListFilters,
          problems: Mapping[str, Dict[str, str]]) -> Dict[str, Any]:
    """Filter by `status` and `type`, then return at most `limit` after the cursor `after`. *problems*: the
    problem of each operation that has one (a corrupt one is FAILED, as its status says)."""
    after = sort_key(filters.after) if filters.after is not None else None
    limit = filters.limit
    selected = []
    for op in operations:
        if after is not None and sort_key(op["id"]) <= after:
            continue
        if filters.type is not None and op["type"] != filters.type:
            continue
        if filters.status is not None and _status(store, op["id"], problems) != filters.status:
            continue
        selected.append(op)
        if limit is not None and len(selected) > limit:
            break
    result: Dict[str, Any] = {"operations": selected[:limit] if limit is not None else selected}
    if limit is not None and len(selected) > limit:
        result["next"] = selected[limit - 1]["id"]
    return result


def _status(store: OperationStore, op_id: str, problems: Mapping[str, Dict[str, str]]) -> str:
    return status_of(Record(op_id, {}, store.end_summary(op_id), problems.get(op_id))).value

