"""Request rules: a POST body checked against its schema and cross-checked, and the job file it makes."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Dict, Tuple

from pg_backup_api.core.errors import InvalidRequest
from pg_backup_api.core.model import OperationType, timestamp

REQUEST_SCHEMAS = {
    OperationType.RECOVERY: "RecoveryRequest",
    OperationType.BACKUP: "BackupRequest",
    OperationType.CONFIG_SWITCH: "ConfigSwitchRequest",
    OperationType.CONFIG_UPDATE: "ConfigUpdateRequest",
}
# The pre-2.0 documentation posts {"operation_type": "recover", ...}.
LEGACY_TYPE_NAMES = {"recover": OperationType.RECOVERY.value}


def parse_request(body: Any, allowed: Tuple[OperationType, ...]) -> Tuple[OperationType, Dict[str, Any]]:
    """Check a POST body; return its type and its fields without the type."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    fields = dict(body)
    type_field = "type"
    if "operation_type" in fields and "type" not in fields:
        type_field = "operation_type"
        legacy = fields.pop("operation_type")
        fields["type"] = LEGACY_TYPE_NAMES.get(legacy, legacy) if isinstance(legacy, str) else legacy
    raw_type = fields.setdefault("type", OperationType.RECOVERY.value)
    names = ", ".join(t.value for t in allowed)
    if not isinstance(raw_type, str) or raw_type not in {t.value for t in allowed}:
        shown = repr(raw_type)
        shown = shown if len(shown) <= 100 else shown[:100] + "..."
        raise InvalidRequest(f"field '{type_field}' must be one of: {names}; got {shown}")
    op_type = OperationType(raw_type)
    from pg_backup_api.rules import schema  # jsonschema is for the service; workers never validate

    schema.validate(REQUEST_SCHEMAS[op_type], fields)
    if op_type is OperationType.RECOVERY:
        check_recovery_targets(fields)
    elif op_type is OperationType.CONFIG_SWITCH:
        check_config_switch(fields)
    elif op_type is OperationType.CONFIG_UPDATE:
        check_config_changes(fields["changes"])
    del fields["type"]
    return op_type, fields


TARGETS = ("target_time", "target_xid", "target_lsn", "target_name", "target_immediate")
AUTO_BACKUP = "auto"


def check_recovery_targets(fields: Dict[str, Any]) -> None:
    """Barman's own cross-checks of a recovery's options, made at POST time rather than as a FAILED."""
    targets = [t for t in TARGETS if fields.get(t) not in (None, False)]
    if len(targets) > 1:
        raise InvalidRequest(f"fields {', '.join(targets)}: at most one recovery target may be given")
    if "target_action" in fields and not targets:
        raise InvalidRequest("field 'target_action' needs a recovery target (target_time, target_xid, "
                             "target_lsn, target_name or target_immediate)")
    if fields.get("exclusive") and not set(targets) & {"target_time", "target_xid", "target_lsn"}:
        raise InvalidRequest("field 'exclusive' needs target_time, target_xid or target_lsn")
    if fields["backup_id"] == AUTO_BACKUP and not set(targets) & {"target_time", "target_lsn"}:
        raise InvalidRequest("backup_id 'auto' needs target_time or target_lsn to choose the backup")


def check_config_switch(fields: Dict[str, Any]) -> None:
    if ("model_name" in fields) == ("reset" in fields):
        raise InvalidRequest("config_switch needs exactly one of 'model_name' and 'reset': true")


def check_config_changes(changes: Any) -> None:
    for i, change in enumerate(changes):
        name_key = "server_name" if change["scope"] == "server" else "model_name"
        other = "model_name" if name_key == "server_name" else "server_name"
        if name_key not in change or other in change:
            raise InvalidRequest(f"field 'changes.{i}': scope '{change['scope']}' needs '{name_key}' "
                                 f"and no '{other}'")
        if len(change) < 3:
            raise InvalidRequest(f"field 'changes.{i}' changes nothing: add a key to set")


def job_document(op_type: OperationType, fields: Dict[str, Any], start: datetime) -> Dict[str, Any]:
    """A job file: the request's fields plus `operation_type` and `start_time`, as the reference has."""
    return {**fields, "operation_type": op_type.value, "start_time": timestamp(start)}
