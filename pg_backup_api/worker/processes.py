"""Who a worker is, whether it still runs, and how to stop it with everything it started.

A pid alone is not an identity: after a reboot or a long uptime another process may
carry it. The pid's start time (in clock ticks since boot, from /proc) plus the boot id
name one process for ever.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_ticks: int
    boot_id: str

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ProcessIdentity":
        return cls(int(data["pid"]), int(data["start_ticks"]), str(data["boot_id"]))


def _boot_id() -> str:
    with open(BOOT_ID_PATH) as f:
        return f.read().strip()


def _stat(pid: int) -> Optional["tuple[str, int]"]:
    """(state, start_ticks) of *pid*, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def identity(pid: Optional[int] = None) -> ProcessIdentity:
    pid = os.getpid() if pid is None else pid
    stat = _stat(pid)
    if stat is None:
        raise ProcessLookupError(pid)
    return ProcessIdentity(pid, stat[1], _boot_id())


def is_alive(ident: ProcessIdentity) -> bool:
    """True while the very process *ident* names runs (a zombie has stopped running)."""
    if ident.boot_id != _boot_id():
        return False
    stat = _stat(ident.pid)
    return stat is not None and stat[1] == ident.start_ticks and stat[0] not in ("Z", "X")


# Every process a worker starts carries this variable, inherited down to rsync and ssh. A process
# group is only a number, which the kernel hands out again once the group is empty; the marker
# tells our processes from a stranger that happens to lead a group with the same number.
MARKER_VARIABLE = "PG_BACKUP_API_OPERATION"


def marker_entry(marker: str) -> str:
    return f"{MARKER_VARIABLE}={marker}"


def _carries(pid: int, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker_entry(marker).encode() in f.read().split(b"\0")
    except OSError:
        return False


def group_members(pgid: int, marker: Optional[str] = None) -> "list[int]":
    """Pids of the running (not zombie) processes of group *pgid*, carrying *marker* if given."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getpgid(pid) != pgid:
                continue
        except OSError:
            continue
        stat = _stat(pid)
        if stat is not None and stat[0] not in ("Z", "X") and (marker is None or _carries(pid, marker)):
            members.append(pid)
    return members


def marked(marker: str) -> "list[int]":
    """Pids of every running process that carries *marker*, whatever its group (a /proc scan)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _carries(int(entry), marker):
            stat = _stat(int(entry))
            if stat is not None and stat[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def signal_members(pgid: int, marker: str, sig: int) -> None:
    """Send *sig* to each process of group *pgid* that carries *marker*."""
    for pid in group_members(pgid, marker):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_group(pgid: int, marker: str, grace: float) -> bool:
    """SIGTERM an operation's processes, then SIGKILL whatever is left after *grace* seconds.

    A worker leads its own session, so its group holds barman, rsync and ssh too.
    Returns True when none of them is left.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not group_members(pgid, marker):
            return True
        signal_members(pgid, marker, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_members(pgid, marker):
                return True
            time.sleep(0.1)
    return not group_members(pgid, marker)
