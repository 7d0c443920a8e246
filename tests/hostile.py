"""Hostile input for property tests and fuzzing: any JSON value, odd text and odd numbers.

Also what the OpenAPI document says a field takes, so a test knows which values must be refused.
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Any, Dict, Iterable, Set

from hypothesis import strategies as st

from pg_backup_api.core.model import OperationType
from pg_backup_api.rules import schema
from pg_backup_api.rules.requests import REQUEST_SCHEMAS

# Digits that are not ASCII (str.isdigit() is true for all of them, int() refuses some),
# NUL, lone surrogates, characters beyond the BMP, traversal, numbers in disguise.
ODD_STRINGS = [
    "", " ", "\x00", "a\x00b", "²", "¹²³", "١٢٣", "٣", "𝟙𝟚", "໑", "Ⅻ", "½", "1.0", "-0", "+1", "1e3", "0x10",
    " 1", "1 ", "\n", "latest\n", "\ud800", "\udfff", "a\ud800b", "\U0001f600", "..", "../..", "/", "//", "%00",
    "%ff", "ssh\x00 host", "ssh postgres@db2\n", "9" * 400, "20261127T093201-²", "20261127T093201-١",
    "٢٠٢٦١١٢٧T093201", "2026-11-27T09:30:00+00:00\n", "0001-01-01T00:00:00+01:00",
]
ODD_NUMBERS = [0, -0.0, -1, 1, 1.0, 1.5, 2**31, 2**63, -(2**63), 10**400, -(10**400), 1e308, -1e308, 5e-324,
               math.nan, math.inf, -math.inf]

any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # every plane, surrogates, NUL
near_text = st.text(alphabet="0123456789²١𝟙T-/.:@+ sshpqilo=az\x00\ud800", max_size=30)
# Every one of these is str.isdigit(); int() refuses the superscripts and the circled one.
odd_digits = st.text(st.sampled_from("0123456789²³¹١٢٣𝟙𝟚۴߁௧①"), min_size=1, max_size=6)
odd_text = st.one_of(st.sampled_from(ODD_STRINGS), any_text, near_text, odd_digits)


def nested(depth: int) -> Any:
    return reduce(lambda inner, i: [inner] if i % 2 else {"a": inner}, range(depth), 0)


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(ODD_NUMBERS), st.floats(), odd_text)
json_values = st.one_of(
    st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
                 max_leaves=10),
    st.integers(2, 300).map(nested),
)


# -- what a field takes ------------------------------------------------------------------------


def _resolved(sub: Dict[str, Any]) -> Dict[str, Any]:
    while "$ref" in sub:
        sub = schema.document()["components"]["schemas"][sub["$ref"].rsplit("/", 1)[1]]
    return sub


def subschema(name: str, path: Iterable[Any]) -> Dict[str, Any]:
    """The schema of the value at *path* (keys and indexes) in a body checked against *name*."""
    sub = _resolved({"$ref": f"#/components/schemas/{name}"})
    for step in path:
        if isinstance(step, int):
            sub = _resolved(sub["items"])
        elif step in sub.get("properties", {}):
            sub = _resolved(sub["properties"][step])
        else:
            sub = _resolved(sub["additionalProperties"])
    return sub


def accepted_kinds(sub: Dict[str, Any]) -> Set[str]:
    """The JSON types a schema takes at all (whatever its other rules)."""
    if "type" in sub:
        kinds = sub["type"] if isinstance(sub["type"], list) else [sub["type"]]
        return set(kinds) | ({"integer"} if "number" in kinds else set())
    if "const" in sub:
        return kinds_of(sub["const"])
    if "enum" in sub:
        return set().union(*(kinds_of(v) for v in sub["enum"]))
    if "oneOf" in sub:
        return set().union(*(accepted_kinds(_resolved(s)) for s in sub["oneOf"]))
    return {"null", "boolean", "integer", "number", "string", "array", "object"}


def kinds_of(value: Any) -> Set[str]:
    """The JSON types *value* is; none for NaN and infinities, which JSON has not."""
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number"} if math.isfinite(value) else set()
    if isinstance(value, str):
        return {"string"}
    return {"array"} if isinstance(value, list) else {"object"}


# -- valid bodies, to mutate one field at a time --------------------------------------------------

BACKUP_ID = "20261127T010000"
RECOVERY = {"backup_id": BACKUP_ID, "destination_directory": "/srv/restore/a", "remote_ssh_command": "ssh postgres@db2"}
CONFIG_KEYS = [k for k in schema.document()["components"]["schemas"]["ConfigChange"]["properties"]
               if k not in ("scope", "server_name", "model_name")]
SERVER_BODIES = [
    {"type": "recovery", "backup_id": BACKUP_ID, "destination_directory": "/srv/restore/full",
     "remote_ssh_command": "ssh -p 2222 -o ConnectTimeout=5 postgres@db2", "target_time": "2026-11-28T00:00:00+00:00",
     "target_action": "promote", "exclusive": True, "target_tli": "latest", "standby_mode": False, "get_wal": True,
     "bwlimit": 10, "jobs": 2, "network_compression": False, "tablespaces": {"tbs1": "/srv/tbs1"},
     "staging_wal_directory": "/srv/wal"},
    {**RECOVERY, "target_xid": "1234", "target_tli": 1},
    {**RECOVERY, "target_lsn": "0/3000060"},
    {**RECOVERY, "target_name": "before_upgrade", "target_action": "pause"},
    {**RECOVERY, "target_immediate": True},
    {"operation_type": "recover", **RECOVERY},
    {"type": "backup", "name": "fuzz", "immediate_checkpoint": True, "incremental": BACKUP_ID, "jobs": 2,
     "bwlimit": 10, "wait_for_wals": False},
    {"type": "config_switch", "model_name": "fuzz-model"},
    {"type": "config_switch", "reset": True},
]
INSTANCE_BODIES = [
    {"type": "config_update", "changes": [{"scope": "server", "server_name": "pg", **{k: "x" for k in CONFIG_KEYS}}]},
    {"type": "config_update", "changes": [{"scope": "model", "model_name": "fuzz-model", "active": True},
                                          {"scope": "server", "server_name": "pg", "description": 5}]},
]


def schema_of(body: Dict[str, Any]) -> str:
    """The request schema *body* is checked against (the older `operation_type: recover` is a recovery)."""
    return REQUEST_SCHEMAS[OperationType(body.get("type", "recovery"))]
