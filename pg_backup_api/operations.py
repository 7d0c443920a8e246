"""The operation model: types, statuses, request rules and the status document. No I/O here."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any, Dict, Optional, Tuple

from pg_backup_api import schema
from pg_backup_api.errors import InvalidRequest
from pg_backup_api.store import Record


class OperationType(str, Enum):
    RECOVERY = "recovery"
    CONFIG_SWITCH = "config_switch"
    CONFIG_UPDATE = "config_update"


class Status(str, Enum):
    """The three values clients such as Patroni's barman script know; never add a fourth."""

    IN_PROGRESS = "IN_PROGRESS"
    DONE = "DONE"
    FAILED = "FAILED"


SERVER_TYPES = (OperationType.RECOVERY, OperationType.CONFIG_SWITCH)
INSTANCE_TYPES = (OperationType.CONFIG_UPDATE,)
REQUEST_SCHEMAS = {
    OperationType.RECOVERY: "RecoveryRequest",
    OperationType.CONFIG_SWITCH: "ConfigSwitchRequest",
    OperationType.CONFIG_UPDATE: "ConfigUpdateRequest",
}
# The pre-2.0 documentation posts {"operation_type": "recover", ...}.
LEGACY_TYPE_NAMES = {"recover": OperationType.RECOVERY.value}


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def timestamp(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def parse_request(body: Any, allowed: Tuple[OperationType, ...]) -> Tuple[OperationType, Dict[str, Any]]:
    """Check a POST body; return its type and its fields without the type."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    fields = dict(body)
    if "operation_type" in fields and "type" not in fields:
        legacy = fields.pop("operation_type")
        fields["type"] = LEGACY_TYPE_NAMES.get(legacy, legacy) if isinstance(legacy, str) else legacy
    raw_type = fields.setdefault("type", OperationType.RECOVERY.value)
    names = ", ".join(t.value for t in allowed)
    if not isinstance(raw_type, str) or raw_type not in {t.value for t in allowed}:
        raise InvalidRequest(f"field 'type' must be one of: {names}; got {raw_type!r}")
    op_type = OperationType(raw_type)
    schema.validate(REQUEST_SCHEMAS[op_type], fields)
    del fields["type"]
    return op_type, fields


def job_document(op_type: OperationType, fields: Dict[str, Any], start: datetime) -> Dict[str, Any]:
    """A job file: the request's fields plus `operation_type` and `start_time`, as the reference has."""
    return {**fields, "operation_type": op_type.value, "start_time": timestamp(start)}


def status_of(record: Record) -> Status:
    """The reference's rule: an output file means ended (DONE if it says success), else in progress."""
    if record.output is None:
        return Status.IN_PROGRESS
    return Status.DONE if record.output.get("success") else Status.FAILED


def describe(record: Record) -> Dict[str, Any]:
    """The status response: the reference's two fields first, then what a client needs to act."""
    job, out = record.job, record.output or {}
    doc: Dict[str, Any] = {"operation_id": record.op_id, "status": status_of(record).value}
    op_type: Optional[str] = job.get("operation_type")
    doc["type"] = op_type
    for key in ("backup_id", "resolved_backup_id", "destination_directory", "remote_ssh_command",
                "model_name", "reset", "changes"):
        if key in job:
            doc[key] = job[key]
    doc["start_time"] = job.get("start_time")
    doc["end_time"] = out.get("end_time")
    doc["exit_code"] = out.get("exit_code")
    doc["output"] = out.get("output") if record.output is not None else None
    if op_type == OperationType.RECOVERY.value:
        doc["recovery_id"] = record.op_id
    return doc
