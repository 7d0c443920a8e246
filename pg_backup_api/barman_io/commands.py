"""The barman command lines the worker runs: built as argv lists, never a shell.

Kept apart from barman_adapter, which imports Barman's Python API: a worker only builds one of these
and runs it, and importing Barman's configuration and catalogue code would cost each recovery
about 35 ms before barman even starts. Only Barman's version is read here (barman_features: `import
barman` alone is its version).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pg_backup_api.barman_io import features as barman_features

# Barman 3.12 renamed `recover` to `restore` and keeps `recover` as an alias.
RESTORE_COMMAND = "restore" if barman_features.running().has("restore_command") else "recover"

# Names the barman executable to run instead of the one found: for tests that run the real worker
# with a stand-in barman. Only whoever sets the service's environment can set it, and they choose
# what the service runs anyway.
BARMAN_VARIABLE = "PG_BACKUP_API_BARMAN"


def barman_executable() -> str:
    """PG_BACKUP_API_BARMAN if set, else the barman installed beside this Python (a venv), else the one on PATH."""
    override = os.environ.get(BARMAN_VARIABLE)
    if override:
        return override
    beside = Path(sys.executable).parent / "barman"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("barman") or "barman"


VALUE_OPTIONS = {
    "target_time": "--target-time", "target_xid": "--target-xid", "target_lsn": "--target-lsn",
    "target_name": "--target-name", "target_tli": "--target-tli", "target_action": "--target-action",
    "bwlimit": "--bwlimit", "jobs": "--jobs", "staging_wal_directory": "--staging-wal-directory",
}
SWITCH_OPTIONS = {  # option: (flag when true, flag when false)
    "target_immediate": ("--target-immediate", None), "exclusive": ("--exclusive", None),
    "standby_mode": ("--standby-mode", None), "get_wal": ("--get-wal", "--no-get-wal"),
    "network_compression": ("--network-compression", "--no-network-compression"),
}


def restore_argv(config_path: str, server: str, backup_id: str, destination: str,
                 remote_ssh_command: str, options: Optional[Dict[str, Any]] = None,
                 copy_retry: Optional[Tuple[int, int]] = None) -> List[str]:
    """`barman restore` as an argv list: never a shell, `--opt=value` and positionals after `--`; with
    *copy_retry* (times, seconds), Barman copies again what a failed rsync left."""
    argv = [barman_executable(), "-c", config_path, RESTORE_COMMAND,
            f"--remote-ssh-command={remote_ssh_command}"]
    if copy_retry:
        argv += [f"--retry-times={copy_retry[0]}", f"--retry-sleep={copy_retry[1]}"]
    options = options or {}
    for key, flag in VALUE_OPTIONS.items():
        if options.get(key) is not None:
            argv.append(f"{flag}={options[key]}")
    for key, (on, off) in SWITCH_OPTIONS.items():
        flag = on if options.get(key) is True else off if options.get(key) is False else None
        if flag:
            argv.append(flag)
    for name, location in sorted((options.get("tablespaces") or {}).items()):
        argv.append(f"--tablespace={name}:{location}")
    return [*argv, "--", server, backup_id, destination]


def backup_argv(config_path: str, server: str, options: Dict[str, Any]) -> List[str]:
    argv = [barman_executable(), "-c", config_path, "backup"]
    if options.get("name"):
        argv.append(f"--name={options['name']}")
    if options.get("immediate_checkpoint") is not None:
        argv.append("--immediate-checkpoint" if options["immediate_checkpoint"] else "--no-immediate-checkpoint")
    if options.get("incremental"):
        argv.append(f"--incremental={options['incremental']}")
    for key in ("jobs", "bwlimit"):
        if options.get(key) is not None:
            argv.append(f"--{key}={options[key]}")
    if options.get("wait_for_wals"):
        argv.append("--wait")
    return [*argv, "--", server]


def config_switch_argv(config_path: str, server: str, options: Dict[str, Any]) -> List[str]:
    argv = [barman_executable(), "-c", config_path, "config-switch"]
    if options.get("reset"):
        return [*argv, "--reset", "--", server]
    return [*argv, "--", server, options["model_name"]]


def config_update_argv(config_path: str, changes: List[Dict[str, Any]]) -> List[str]:
    return [barman_executable(), "-c", config_path, "config-update", "--", json.dumps(changes)]


NEW_BACKUP_ID = re.compile(r"^Starting backup using \S+ method for server \S+ in \S*/([0-9]{8}T[0-9]{6})$",
                           re.MULTILINE)


def new_backup_id(output: str) -> Optional[str]:
    """The id of the backup `barman backup` reports starting."""
    match = NEW_BACKUP_ID.search(output)
    return match.group(1) if match else None


# Barman prints what stopped it as "ERROR: ..." (and an unexpected failure as "EXCEPTION: ...") at
# the start of a line, in red on a terminal. The operation's `reason` quotes them so that a client
# learns why without reading the whole output; the output keeps every line.
ERROR_LINE = re.compile(r"(?:ERROR|EXCEPTION): *(.*)")
COLOUR = re.compile(r"\x1b\[[0-9;]*m")
MAX_ERRORS = 3
MAX_ERROR_CHARS = 400


def errors_in(output: str) -> List[str]:
    """Barman's error messages in *output*, first first, each once, at most MAX_ERRORS, each cut to
    MAX_ERROR_CHARS (the output holds them whole)."""
    found: List[str] = []
    for line in output.splitlines():
        match = ERROR_LINE.match(COLOUR.sub("", line))
        if not match:
            continue
        message = match.group(1).strip()
        if len(message) > MAX_ERROR_CHARS:
            message = message[:MAX_ERROR_CHARS - 1] + "…"
        if message and message not in found:
            found.append(message)
        if len(found) == MAX_ERRORS:
            break
    return found
