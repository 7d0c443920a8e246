"""`pg-backup-api doctor`: checks of what the service depends on, each naming what is wrong."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

from pg_backup_api.barman_io import adapter as barman_adapter
from pg_backup_api.core.errors import ApiError, CorruptState
from pg_backup_api.core.ids import is_valid_id
from pg_backup_api.core.model import now_utc
from pg_backup_api.service.use_cases import Service, worker_identity
from pg_backup_api.store.claims import CLAIMS_DIR, HOSTS_DIR, SLOT_SUFFIX
from pg_backup_api.store.jobs import OperationStore, read_job_file, read_state_file
from pg_backup_api.worker import processes, runner

# Where `doctor --fix` moves unreadable state files, under Barman's home: jobs/quarantine/<server>/.
QUARANTINE_DIR = "quarantine"
INSTANCE = "_instance"


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    message: str


# A check looks at the service's world and says what it found; only with fix=True may it repair.
Check = Callable[[Service, bool], List[Finding]]


def check_barman_configuration(service: Service, fix: bool = False) -> List[Finding]:
    config = service.config_source.get()
    counts = f"{len(config.server_names)} server(s), {len(config.model_names)} model(s)"
    return [Finding("barman-config", True, f"{config.path} loads as `barman` reads it ({counts})")]


def check_barman_version(service: Service, fix: bool = False) -> List[Finding]:
    barman = service.discovery.barman()
    lacks = "; ".join(f"{f['what']} (needs Barman >= {f['needs']})" for f in barman["lacks"])
    return [Finding("barman-version", True, f"Barman {barman['version']}" + (f" lacks: {lacks}" if lacks else
                                                                           ": every feature of the API"))]


def check_config_changes_queue(service: Service, fix: bool = False) -> List[Finding]:
    queue = service.discovery.config_changes_queue()
    path = queue["path"]
    if path is None:
        return [Finding("config-changes-queue", True, "this Barman has no configuration change queue")]
    if queue.get("error"):
        return [Finding("config-changes-queue", False, f"{path} cannot be read: {queue['error']}")]
    if not queue["pending"]:
        return [Finding("config-changes-queue", True, f"{path}: no change waits")]
    if not queue["stuck"]:
        return [Finding("config-changes-queue", True,
                        f"{path}: {queue['pending']} change set(s) wait while a config_update runs")]
    pending = barman_adapter.describe_config_changes_queue(service.config_source.get())
    return [Finding("config-changes-queue", False,
                    f"{path}: {queue['pending']} change set(s) wait and no config_update runs, so Barman "
                    f"could not apply them; every `barman cron` and config-update fails until they are "
                    f"applied by hand or removed from that file:\n{pending}")]


def _state_files(store: OperationStore) -> Iterator[Tuple[str, Path]]:
    """(operation id, path) of every job, output and worker identity file of *store*."""
    for directory, suffix in ((store.jobs_dir, ".json"), (store.output_dir, ".json"),
                              (store.workers_dir, ".worker")):
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        for name in names:
            if name.endswith(suffix) and is_valid_id(name[:-len(suffix)]):
                yield name[:-len(suffix)], directory / name


def _problem(store: OperationStore, op_id: str, path: Path) -> Optional[str]:
    """Why *path* cannot be trusted, or None."""
    try:
        if path.name.endswith(".worker"):
            worker_identity(store, op_id)
        elif path.parent == store.jobs_dir:
            read_job_file(path)
        else:
            read_state_file(path)
    except CorruptState as exc:
        return exc.reason
    return None


def _quarantine(home: Path, group: str, path: Path) -> Path:
    """Move *path* to jobs/quarantine/<group>/<name>.<UTC time>; the place it went."""
    target_dir = home / "jobs" / QUARANTINE_DIR / group
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{path.name}.{now_utc().strftime('%Y%m%dT%H%M%S%fZ')}"
    os.replace(path, target)
    return target


def _fixed(home: Path, group: str, path: Path, marker: Optional[str]) -> Tuple[bool, str]:
    """Quarantine *path* unless processes of its operation still run (they would go unwatched)."""
    running = processes.marked(marker) if marker else []
    if running:
        return False, (f"not moved: processes {', '.join(map(str, running))} of its operation still run; "
                       "stop them first")
    return True, f"moved to {_quarantine(home, group, path)}"


def check_state_files(service: Service, fix: bool = False) -> List[Finding]:
    """Job, output, worker identity, claim and slot files that cannot be read: each makes its operation
    `corrupt` and holds its claim (or its slot). With *fix*, move them into jobs/quarantine/."""
    config = service.config_source.get()
    home = config.barman_home
    findings: List[Finding] = []
    checked = 0
    for server in [None, *config.server_names]:
        store = OperationStore(home / server if server else home, server)
        for op_id, path in _state_files(store):
            checked += 1
            reason = _problem(store, op_id, path)
            if reason is None:
                continue
            message = f"{path} cannot be read ({reason}): operation '{op_id}' is reported corrupt and holds its claim"
            ok = False
            if fix:
                ok, done = _fixed(home, server or INSTANCE, path, runner.operation_marker(server, op_id))
                message += f"; {done}"
            findings.append(Finding("state-files", ok, message))
    claims = home / "jobs" / CLAIMS_DIR
    hosts = home / "jobs" / HOSTS_DIR
    held = [(path, "the destination it claims stays blocked") for path in sorted(claims.glob("*.claim"))]
    held += [(path, "it counts as a running recovery on its host") for path in sorted(hosts.glob(f"*/*{SLOT_SUFFIX}"))]
    for path, blocked in held:
        checked += 1
        try:
            holder = read_state_file(path)
            if holder is not None and not isinstance(holder.get("operation_id"), str):
                raise CorruptState(str(path), "it names no operation")
        except CorruptState as exc:
            message = f"{path} cannot be read ({exc.reason}): {blocked}"
            ok = False
            if fix:
                ok, done = _fixed(home, "claims", path, None)
                message += f"; {done}"
            findings.append(Finding("state-files", ok, message))
    if not findings:
        findings.append(Finding("state-files", True, f"{checked} state file(s) under {home} read"))
    return findings


CHECKS: List[Tuple[str, Check]] = [
    ("barman-version", check_barman_version),
    ("barman-config", check_barman_configuration),
    ("config-changes-queue", check_config_changes_queue),
    ("state-files", check_state_files),
]


def run(service: Service, fix: bool = False) -> List[Finding]:
    """Every check, in order; a check that cannot run is a failed finding, not a crash."""
    findings: List[Finding] = []
    for name, check in CHECKS:
        try:
            findings.extend(check(service, fix))
        except ApiError as exc:
            findings.append(Finding(name, False, exc.message))
    return findings
