"""The operation model: types, states and the status document of a record. No I/O here."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any, Dict, Mapping, Optional

from pg_backup_api.core.records import Record


class OperationType(str, Enum):
    RECOVERY = "recovery"
    BACKUP = "backup"
    CONFIG_SWITCH = "config_switch"
    CONFIG_UPDATE = "config_update"


class Status(str, Enum):
    """The three values clients such as Patroni's barman script know; never add a fourth."""

    IN_PROGRESS = "IN_PROGRESS"
    DONE = "DONE"
    FAILED = "FAILED"


class State(str, Enum):
    """The richer state beside `status`, in a field of its own so `status` keeps its three values."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    LOST = "lost"
    # A state file of the operation cannot be read: reported, and its claim held, until an operator acts.
    CORRUPT = "corrupt"
    # A cancel could not stop every process (they survived SIGKILL): still running, still claimed.
    CANCEL_FAILED = "cancel_failed"
    # A recovery waiting for a slot on its target host (max_recoveries_per_host): nothing started yet.
    QUEUED = "queued"


STATUS_OF_STATE = {State.RUNNING: Status.IN_PROGRESS, State.SUCCEEDED: Status.DONE,
                   State.CANCEL_FAILED: Status.IN_PROGRESS, State.QUEUED: Status.IN_PROGRESS}
# States whose processes may still run: the status shows progress rather than an end.
LIVE_STATES = (State.RUNNING, State.CANCEL_FAILED, State.QUEUED)

# Lines barman prints as a restore moves on, and the phase each one starts.
PHASE_MARKERS = (
    ("Starting ", "preparing"),
    ("Copying the base backup", "copying base backup"),
    ("Copying required WAL segments", "copying WAL"),
    ("Generating archive status files", "finalising"),
    ("Generating recovery configuration", "finalising"),
    ("Identify dangerous settings", "finalising"),
    ("Restore operation completed", "finalising"),
)
TAIL_LINES = 20
# The lines a recovery's worker writes while it waits for a slot on its target host, and once it has one.
WAITING_LINE = "pg-backup-api: waiting for a slot on "
SLOT_LINE = "pg-backup-api: got a slot on "

SERVER_TYPES = (OperationType.RECOVERY, OperationType.BACKUP, OperationType.CONFIG_SWITCH)
INSTANCE_TYPES = (OperationType.CONFIG_UPDATE,)
ADMIN_TYPES = (OperationType.CONFIG_SWITCH.value, OperationType.CONFIG_UPDATE.value)

RECOVERY_OPTIONS = ("target_time", "target_xid", "target_lsn", "target_name", "target_immediate",
                    "target_tli", "target_action", "exclusive", "standby_mode", "get_wal", "bwlimit", "jobs",
                    "network_compression", "tablespaces", "staging_wal_directory")


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def timestamp(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def state_of(record: Record) -> State:
    """The reference's rule underneath: no output file means running; else what the output says."""
    if record.problem is not None:
        return State(record.problem["state"])
    if record.output is None:
        return State.RUNNING
    return ended_state(record.output)


def ended_state(output: Mapping[str, Any]) -> State:
    """The state an output file (or the index's summary of one) records; from `success` alone when
    `state` is missing or not a state: the reference records only `success`."""
    try:
        return State(output.get("state"))
    except ValueError:
        return State.SUCCEEDED if output.get("success") else State.FAILED


def status_of(record: Record) -> Status:
    return STATUS_OF_STATE.get(state_of(record), Status.FAILED)


def phase_of(progress: str) -> str:
    phase = "preparing"
    for line in progress.splitlines():
        if line.startswith(WAITING_LINE):
            phase = f"waiting for a slot on {line[len(WAITING_LINE):].split(' ', 1)[0]}"
        elif line.startswith(SLOT_LINE):
            phase = "preparing"
        for marker, name in PHASE_MARKERS:
            if line.startswith(marker):
                phase = name
    return phase


def parse_time(value: Any) -> Optional[datetime]:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    # The reference wrote local times without an offset; read them as this host's local time.
    return moment if moment.tzinfo else moment.astimezone()


def duration(record: Record, now: datetime) -> Optional[float]:
    start = parse_time(record.job.get("start_time"))
    end = parse_time((record.output or {}).get("end_time")) if record.output is not None else now
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def describe(record: Record, progress: str = "", now: Optional[datetime] = None) -> Dict[str, Any]:
    """The status response: the reference's two fields first, then what a client needs to act.

    *progress* is what barman has printed so far, used while the operation runs.
    """
    job, out = record.job, record.output or {}
    state = state_of(record)
    phase = phase_of(progress) if state in LIVE_STATES else None
    if state is State.RUNNING and phase is not None and phase.startswith("waiting for a slot on "):
        state = State.QUEUED
    doc: Dict[str, Any] = {"operation_id": record.op_id, "status": status_of(record).value,
                           "state": state.value}
    op_type: Optional[str] = job.get("operation_type")
    doc["type"] = op_type
    for key in ("backup_id", "resolved_backup_id", "destination_directory", "remote_ssh_command",
                *RECOVERY_OPTIONS, "model_name", "reset", "changes", "name", "immediate_checkpoint",
                "new_backup_id", "requested_by"):
        if key in job:
            doc[key] = job[key]
        elif key in out:
            doc[key] = out[key]
    doc["start_time"] = job.get("start_time")
    doc["end_time"] = out.get("end_time")
    doc["duration_s"] = duration(record, now or now_utc())
    if state in LIVE_STATES:
        doc["phase"] = phase
        doc["output_tail"] = progress.splitlines()[-TAIL_LINES:]
    else:
        doc["exit_code"] = out.get("exit_code")
        if out.get("reason"):
            doc["reason"] = out["reason"]
        doc["output"] = out.get("output")
    if record.problem is not None:
        doc["reason"] = record.problem["reason"]
        if record.problem.get("file"):
            doc["corrupt_file"] = record.problem["file"]
    if op_type == OperationType.RECOVERY.value:
        doc["recovery_id"] = record.op_id
    return doc
