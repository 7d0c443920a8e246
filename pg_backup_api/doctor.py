"""`pg-backup-api doctor`: checks of what the service depends on, each naming what is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

from pg_backup_api import barman_adapter
from pg_backup_api.errors import ApiError
from pg_backup_api.service import Service


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    message: str


# A check looks at the service's world and says what it found; it never changes anything.
Check = Callable[[Service], List[Finding]]


def check_barman_configuration(service: Service) -> List[Finding]:
    config = service.config_source.get()
    counts = f"{len(config.server_names)} server(s), {len(config.model_names)} model(s)"
    return [Finding("barman-config", True, f"{config.path} loads as `barman` reads it ({counts})")]


def check_config_changes_queue(service: Service) -> List[Finding]:
    queue = service.config_changes_queue()
    path = queue["path"]
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


CHECKS: List[Tuple[str, Check]] = [
    ("barman-config", check_barman_configuration),
    ("config-changes-queue", check_config_changes_queue),
]


def run(service: Service) -> List[Finding]:
    """Every check, in order; a check that cannot run is a failed finding, not a crash."""
    findings: List[Finding] = []
    for name, check in CHECKS:
        try:
            findings.extend(check(service))
        except ApiError as exc:
            findings.append(Finding(name, False, exc.message))
    return findings
