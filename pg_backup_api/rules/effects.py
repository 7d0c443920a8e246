"""Every path an operation makes Barman write, wipe or remove on a host, and the rules each must pass.

Each request field of each operation type is declared in FIELD_EFFECTS: either the effect it has on
paths of a host, or an explicit reason why it has none. A field without a declaration is refused, so
a new option cannot reach Barman before its effects are declared (tests/test_effects.py checks the
table against the OpenAPI document).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pg_backup_api.core.errors import ApiError, Conflict, InvalidRequest, Unprocessable
from pg_backup_api.core.model import OperationType
from pg_backup_api.rules import paths
from pg_backup_api.rules.requests import TARGETS

# What Barman (or PostgreSQL, from what Barman writes) does to a path.
WIPE = "wiped and rewritten by Barman (rsync --delete)"
STAGE = ("created and filled with WAL by Barman, then removed with rm -fr by PostgreSQL at the end of recovery, "
         "with everything in it (so it must not exist or be empty)")
STAGE_SUBDIRS = "sub-directories created, filled and removed by Barman (staging_location = remote)"

# Never written into, nor anything below them.
SYSTEM_DIRECTORIES = tuple(
    "/bin /boot /dev /etc /lib /lib32 /lib64 /libx32 /proc /root /run /sbin /snap /sys /usr "
    "/var/backups /var/cache /var/lib/apt /var/lib/barman /var/lib/dpkg /var/lib/rpm /var/lib/systemd "
    "/var/lock /var/log /var/mail /var/run /var/spool".split())
# Hold other people's or other clusters' data: never the target itself, though a directory of its
# own inside them is fine.
SHARED_DIRECTORIES = frozenset(
    "/ /home /media /mnt /opt /srv /tmp /var /var/lib /var/lib/pgsql /var/lib/postgresql /var/local "
    "/var/opt /var/tmp".split())
# Also shared: a user's home (/home/<user>) and a PostgreSQL version's directory (/var/lib/postgresql/15).
SHARED_PARENTS = ("/home", "/var/lib/postgresql", "/var/lib/pgsql")


@dataclass(frozen=True)
class Effect:
    """One thing an operation makes happen to a path of a host; *field* is what the client set."""

    host: str
    path: str
    action: str
    field: str
    origin: str = ""  # when the path is not the client's: where it comes from
    resolved_from: str = ""  # when *path* is where this path leads on the target host (symbolic links followed)


@dataclass(frozen=True)
class Declared:
    """A request field's effect on paths of a host: an action, or None and the reason it has none."""

    action: Optional[str]
    why: str = ""


def _none(why: str) -> Declared:
    return Declared(None, why)


_TARGET = _none("written into the recovery configuration inside destination_directory")
_COPY = _none("changes how Barman copies, not where")
FIELD_EFFECTS: Dict[OperationType, Dict[str, Declared]] = {
    OperationType.RECOVERY: {
        "type": _none("selects the operation"),
        "backup_id": _none("chooses what is copied, not where"),
        "destination_directory": Declared(WIPE),
        "remote_ssh_command": _none("names the host (narrowed by allowed_hosts), not a path"),
        **{target: _TARGET for target in TARGETS},
        "target_tli": _none("a timeline; like any target it makes Barman stage WAL (see staging_wal_directory)"),
        "target_action": _TARGET,
        "exclusive": _TARGET,
        "standby_mode": _none("WAL then goes into the destination's pg_wal, inside destination_directory"),
        "get_wal": _none("with false, WAL is copied into pg_wal or the staging directory, declared there; "
                         "with true, PostgreSQL fetches it into its own pg_wal"),
        "bwlimit": _COPY,
        "jobs": _COPY,
        "network_compression": _COPY,
        "tablespaces": Declared(WIPE),
        "staging_wal_directory": Declared(STAGE),
    },
    OperationType.BACKUP: {
        "type": _none("selects the operation"),
        **{name: _none("Barman writes a backup only under its own home") for name in
           ("name", "immediate_checkpoint", "incremental", "jobs", "bwlimit", "wait_for_wals")},
    },
    OperationType.CONFIG_SWITCH: {
        "type": _none("selects the operation"),
        "model_name": _none("Barman writes only its own model marker under its home"),
        "reset": _none("Barman removes only its own model marker under its home"),
    },
    OperationType.CONFIG_UPDATE: {
        "type": _none("selects the operation"),
        "changes": _none("Barman writes only its own configuration; paths and commands are refused keys"),
    },
}
# Fields the service itself adds to the job before it is stored.
RECORDED_FIELDS: Dict[str, Declared] = {
    "requested_by": _none("who asked, recorded in the job"),
    "resolved_backup_id": _none("the backup chosen, recorded in the job"),
    "resolved_destination_directory": _none("where destination_directory leads on the target host (symbolic "
                                            "links followed), recorded in the job and claimed"),
    "target_address": _none("the address ssh connects to, recorded in the job: the worker's host slots"),
}


@dataclass(frozen=True)
class RecoveryTarget:
    """What only the chosen backup and the target tell about a recovery's effects."""

    host: str
    # name -> location recorded in the backup; Barman restores a tablespace there unless relocated
    backup_tablespaces: Mapping[str, str] = field(default_factory=dict)
    # Barman's configured staging_path, when it stages this backup on the target host
    remote_staging_path: Optional[str] = None


@dataclass(frozen=True)
class PathRules:
    """The rules every effect is checked against; the last one is the operator's, the others built in."""

    server: str
    barman_home: str
    pg_binaries: Tuple[str, ...] = ()  # the server's path_prefix entries
    allowed_destinations: Tuple[str, ...] = ()


def declaration(op_type: OperationType, name: str) -> Declared:
    declared = FIELD_EFFECTS[op_type].get(name) or RECORDED_FIELDS.get(name)
    if declared is None:
        # Refuse rather than let an undeclared option reach Barman.
        raise ApiError(f"field '{name}' of {op_type.value} has no declared effect; refusing to run it")
    return declared


def _declared(op_type: OperationType, fields: Mapping[str, Any]) -> None:
    for name in fields:
        declaration(op_type, name)


def recovery_effects(fields: Mapping[str, Any], target: RecoveryTarget) -> List[Effect]:
    """Every path a `barman restore` with *fields* writes, wipes or removes on the target host."""
    _declared(OperationType.RECOVERY, fields)
    host = target.host
    destination = fields["destination_directory"]
    found = [Effect(host, destination, WIPE, "destination_directory")]
    relocated = dict(fields.get("tablespaces") or {})
    for name, location in target.backup_tablespaces.items():
        if name not in relocated:
            found.append(Effect(host, location, WIPE, f"tablespaces.{name}",
                                "the backup's own location of the tablespace; relocate it with 'tablespaces'"))
    # Names the backup lacks are refused later; their paths are checked all the same.
    found += [Effect(host, location, WIPE, f"tablespaces.{name}") for name, location in sorted(relocated.items())]
    if fields.get("staging_wal_directory") is not None:
        found.append(Effect(host, fields["staging_wal_directory"], STAGE, "staging_wal_directory"))
    elif any(fields.get(t) not in (None, False) for t in (*TARGETS, "target_tli")):
        # Barman's default for a point-in-time recovery.
        found.append(Effect(host, posixpath.join(destination, "barman_wal"), STAGE, "staging_wal_directory",
                            "Barman's default, barman_wal inside destination_directory"))
    if target.remote_staging_path:
        found.append(Effect(host, target.remote_staging_path, STAGE_SUBDIRS, "staging_path",
                            "Barman's configuration of the server"))
    return found


def backup_effects(fields: Mapping[str, Any]) -> List[Effect]:
    """None on any other host: Barman copies from PostgreSQL into its own home."""
    _declared(OperationType.BACKUP, fields)
    return []


def config_switch_effects(fields: Mapping[str, Any]) -> List[Effect]:
    """None outside Barman's home: the active model is a marker file there."""
    _declared(OperationType.CONFIG_SWITCH, fields)
    return []


def config_update_effects(fields: Mapping[str, Any]) -> List[Effect]:
    """None outside Barman's configuration: the keys it takes name no path."""
    _declared(OperationType.CONFIG_UPDATE, fields)
    return []


def effects_of(op_type: OperationType, fields: Mapping[str, Any],
               target: Optional[RecoveryTarget] = None) -> List[Effect]:
    if op_type is OperationType.RECOVERY:
        if target is None:
            raise ValueError("a recovery's effects need its target")
        return recovery_effects(fields, target)
    if op_type is OperationType.BACKUP:
        return backup_effects(fields)
    if op_type is OperationType.CONFIG_SWITCH:
        return config_switch_effects(fields)
    return config_update_effects(fields)


def is_within(path: str, parent: str) -> bool:
    """*path* is *parent* or below it, comparing whole components (/etcetera is not within /etc)."""
    parent = parent.rstrip("/") or "/"
    return path == parent or path.startswith(parent if parent == "/" else parent + "/")


def _normalised(path: str) -> str:
    return posixpath.normpath(path) if path.startswith("/") else path


def check_effects(effects: Sequence[Effect], rules: PathRules) -> None:
    """Refuse the operation unless every effect passes every rule: InvalidRequest (400) or Unprocessable (422)."""
    for effect in effects:
        if not isinstance(effect.path, str):
            raise InvalidRequest(f"field '{effect.field}' must be a string")
        try:
            paths.check_target_path(effect.field, effect.path)
        except InvalidRequest:
            if not effect.resolved_from:
                raise
            raise _refuse(effect, "not a normalised absolute path of letters, digits and ._-/ only",
                          repr(effect.path)) from None
    for effect in effects:
        _check_built_in(effect, rules)
    _check_overlaps(effects)
    if rules.allowed_destinations:
        for effect in effects:
            _check_allowed(effect, rules)


def _subject(effect: Effect, shown: Optional[str] = None) -> str:
    """"field 'F' (origin): PATH", or for a resolved path "...: LINK resolves on the target host to PATH, which"."""
    origin = f" ({effect.origin})" if effect.origin else ""
    path = effect.path if shown is None else shown
    if effect.resolved_from:
        return f"field '{effect.field}'{origin}: {effect.resolved_from} resolves on the target host to {path}, which"
    return f"field '{effect.field}'{origin}: {path}"


def _refuse(effect: Effect, why: str, shown: Optional[str] = None) -> InvalidRequest:
    return InvalidRequest(f"{_subject(effect, shown)} is {why}; it would be {effect.action}")


def _check_built_in(effect: Effect, rules: PathRules) -> None:
    path = effect.path
    for system in SYSTEM_DIRECTORIES:
        if is_within(path, system):
            raise _refuse(effect, f"inside the system directory {system}")
    # Barman only makes sub-directories of its own in a staging_path, so that may be a shared one.
    shared = path in SHARED_DIRECTORIES or posixpath.dirname(path) in SHARED_PARENTS
    if shared and effect.action != STAGE_SUBDIRS:
        raise _refuse(effect, "a directory that holds others' data: name a directory of its own inside it")
    if ".ssh" in path.split("/"):
        raise _refuse(effect, "in a .ssh directory (ssh keys and authorized_keys)")
    protected = [(_normalised(rules.barman_home), "Barman's home")] if rules.barman_home else []
    protected += [(_normalised(b), f"PostgreSQL's binaries (path_prefix of server '{rules.server}')")
                  for b in rules.pg_binaries]
    for directory, what in protected:
        if is_within(path, directory):
            raise _refuse(effect, f"inside {what} {directory}")
        if is_within(directory, path):
            raise _refuse(effect, f"a parent of {what} {directory}")


# Nestings Barman itself makes or supports: WAL staged inside a copied directory (its default is
# barman_wal inside the destination), and a tablespace inside the destination (Barman excludes it
# from the destination's rsync --delete).
def _nesting_allowed(inner: Effect, outer: Effect) -> bool:
    if outer.action != WIPE:
        return False
    if inner.action == STAGE:
        return True
    return outer.field == "destination_directory" and inner.field.startswith("tablespaces.")


def _check_overlaps(effects: Sequence[Effect]) -> None:
    checked = [e for e in effects if e.action != STAGE_SUBDIRS]  # Barman's own named sub-directories only
    for i, first in enumerate(checked):
        for second in checked[i + 1:]:
            if first.host.lower() != second.host.lower():
                continue
            where = " on the target host" if first.resolved_from or second.resolved_from else ""
            if first.path == second.path:
                raise InvalidRequest(f"fields '{first.field}' and '{second.field}' name the same directory "
                                     f"{first.path}{where}: one would be {first.action}, the other {second.action}")
            for inner, outer in ((first, second), (second, first)):
                if is_within(inner.path, outer.path) and not _nesting_allowed(inner, outer):
                    raise InvalidRequest(
                        f"{_subject(inner)} is inside {outer.path}{where} (field '{outer.field}'), "
                        f"which would be {outer.action}")


def _check_allowed(effect: Effect, rules: PathRules) -> None:
    if not any(is_within(effect.path, _normalised(allowed)) for allowed in rules.allowed_destinations):
        raise Unprocessable(
            f"{_subject(effect)} is not under an allowed destination of server "
            f"'{rules.server}' (allowed: {', '.join(rules.allowed_destinations)}); it would be {effect.action}")


# What the target host says is at a path (target_probe.py asks it).
ABSENT = "absent"  # nothing, not even a symbolic link
EMPTY = "empty"  # an empty directory (or a link to one)
FILLED = "filled"  # a directory that holds something
UNREADABLE = "unreadable"  # a directory whose entries the ssh user cannot list
OTHER = "other"  # anything else: a file, a dangling symbolic link, a socket...
KINDS = (ABSENT, EMPTY, FILLED, UNREADABLE, OTHER)


@dataclass(frozen=True)
class OnTarget:
    """One path as the target host sees it: what is there, and where it really leads."""

    kind: str
    real: Optional[str]  # every symbolic link followed; None when it cannot be (a loop of links)


def check_on_target(effects: Sequence[Effect], seen: Mapping[str, OnTarget], rules: PathRules) -> List[Effect]:
    """The path rules again on where each path really leads on the target, then the staging rule.

    *seen* has an answer for every effect's path. Returns the effects with their real paths.
    InvalidRequest (400) or Unprocessable (422) as check_effects; Conflict (409) for a staging
    directory that PostgreSQL would delete with what it holds.
    """
    resolved = []
    for effect in effects:
        real = seen[effect.path].real
        if real is None:
            raise Unprocessable(f"{_subject(effect)} cannot be resolved on the target host (a loop of symbolic "
                                f"links, or no readlink there); it would be {effect.action}")
        resolved.append(effect if real == effect.path else replace(effect, path=real, resolved_from=effect.path))
    check_effects(resolved, rules)
    for effect in effects:
        refusal = staging_refusal(effect, seen[effect.path])
        if refusal is not None:
            raise Conflict(refusal)
    return resolved


_NOT_EMPTY = {FILLED: "is a directory that holds files", UNREADABLE: "is a directory whose entries cannot be "
              "listed", OTHER: "exists and is not a directory"}


def staging_refusal(effect: Effect, found: OnTarget) -> Optional[str]:
    """Why a staging directory the client named must not be used as it is on the target, or None.

    PostgreSQL deletes it with everything in it (recovery_end_command 'rm -fr DIR'): it must not
    exist or be empty. Barman's default (barman_wal inside the destination) needs no such check: the
    destination is empty or absent (Barman refuses one that is not), and so is anything inside it.
    """
    if effect.action != STAGE or effect.origin or found.kind in (ABSENT, EMPTY):
        return None
    return (f"field '{effect.field}': {effect.path} {_NOT_EMPTY[found.kind]} on the target host; PostgreSQL would "
            f"delete it and everything in it at the end of recovery (recovery_end_command 'rm -fr {effect.path}'): "
            "name a directory that does not exist or is empty")

