"""The only module that talks to Barman: its configuration, its catalogue, its command line."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from glob import glob
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import barman
from barman.config import Config
from barman.infofile import BackupInfo

from pg_backup_api.barman_io import config as barman_config
from pg_backup_api.barman_io import features as barman_features
from pg_backup_api.barman_io.commands import barman_executable, errors_in
from pg_backup_api.core.errors import (
    BarmanNoDocument,
    BarmanUnavailable,
    ConfigurationError,
    InvalidRequest,
    NoSuchBackup,
    NoSuchServer,
    Unprocessable,
)
from pg_backup_api.core.reloading import Reloading

log = logging.getLogger(__name__)


# Aliases Barman accepts for a backup id, matched exactly (never as substrings).
LATEST = ("latest", "last")
OLDEST = ("oldest", "first")
LATEST_FULL = ("latest-full", "last-full")
LAST_FAILED = ("last-failed",)
AUTO = "auto"
# Barman restores DONE backups and those still WAITING_FOR_WALS.
RECOVERABLE = tuple(BackupInfo.STATUS_COPY_DONE)

Fingerprint = Tuple[Tuple[str, int, int, int], ...]


@dataclass(frozen=True)
class BarmanConfig:
    """A fully loaded, never mutated, Barman configuration."""

    path: str
    config: Config
    fingerprint: Fingerprint
    # Files beside the configuration that change it: `.barman.auto.conf` (which `barman
    # config-update` writes) and each server's active model marker (which `config-switch` writes).
    model_markers: Tuple[str, ...] = ()
    # What Barman's Server makes of each server, built once per load, when first asked.
    _verdicts: Dict[str, barman_config.Verdict] = field(default_factory=dict, compare=False, repr=False)

    def current_fingerprint(self) -> Fingerprint:
        return _fingerprint(self.path, self.config.get("barman", "configuration_files_directory"),
                            self.model_markers)

    @property
    def barman_home(self) -> Path:
        return Path(os.path.expanduser(self.config.barman_home))

    @property
    def server_names(self) -> List[str]:
        return sorted(self.config.server_names())

    @property
    def model_names(self) -> List[str]:
        return barman_config.model_names(self.config)

    def server(self, name: str) -> Any:
        """The ServerConfig of *name*, or NoSuchServer."""
        server = self.config.get_server(name)
        if server is None:
            raise NoSuchServer(name)
        return server

    def verdict(self, name: str) -> barman_config.Verdict:
        """`disabled` and the messages of server *name* as Barman's Server leaves them (`barman show-servers`)."""
        found = self._verdicts.get(name)
        if found is None:  # two requests may both build it: the same answer, once per load at worst
            found = self._verdicts[name] = barman_config.verdict(self.server(name))
        return found


def _fingerprint(path: str, conf_dir: Optional[str], extra: Tuple[str, ...] = ()) -> Fingerprint:
    """What identifies the configuration's files as they are now: names, mtimes, ctimes and sizes
    (the ctime moves on a chmod too, so making an unreadable file readable counts as a change)."""
    entries = []
    paths = [path, *extra]
    if conf_dir:
        directory = os.path.expanduser(conf_dir)
        paths.append(directory)
        try:
            paths.extend(sorted(e.path for e in os.scandir(directory) if e.name.endswith(".conf")))
        except OSError:
            pass
    for p in paths:
        try:
            st = os.stat(p)
            entries.append((p, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        except OSError:
            entries.append((p, -1, -1, -1))
    return tuple(entries)


def load_config(path: str) -> BarmanConfig:
    """Load Barman's configuration as the `barman` command does, `.barman.auto.conf` included, or
    raise ConfigurationError saying why."""
    if not os.path.isfile(path):
        raise ConfigurationError(f"Barman configuration file '{path}' does not exist")
    try:
        config = barman_config.read_config(path)
    except SystemExit as exc:  # Barman reports some configuration errors with sys.exit
        raise ConfigurationError(f"Barman configuration '{path}' is invalid: {exc}") from None
    except Exception as exc:
        raise ConfigurationError(f"Barman configuration '{path}' is invalid: {exc}") from None
    if not config.barman_home:
        raise ConfigurationError(f"Barman configuration '{path}' sets no barman_home")
    conf_dir = config.get("barman", "configuration_files_directory")
    markers = barman_config.extra_files(config) + tuple(
        os.path.join(s.backup_directory, ".active-model.auto") for s in config.servers())
    return BarmanConfig(path, config, _fingerprint(path, conf_dir, markers), markers)


def error_fingerprint(path: str) -> Fingerprint:
    """The files of a configuration that may not load: the main file, its conf dir (listing and
    files) and `.barman.auto.conf`, found by reading the main file raw; so removing a bad file heals."""
    conf_dir, extra = barman_config.probe_files(path)
    return _fingerprint(path, conf_dir, extra)


class ConfigSource:
    """Hands out the current configuration, reloading it only when one of its files changed.

    A reload builds a new BarmanConfig and then swaps one reference: a request that
    already holds the previous one finishes with it, so no reader ever sees a half-built
    configuration.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._config: Reloading[BarmanConfig] = Reloading(self._load, self._files)
        self._loaded_once = False

    def get(self) -> BarmanConfig:
        return self._config.get()

    def _files(self, config: Optional[BarmanConfig]) -> Fingerprint:
        # A failed load is keyed on every file it may have failed on (found by reading the main
        # file raw), whether a load succeeded before or not: changing any of them retries the load.
        return config.current_fingerprint() if config is not None else error_fingerprint(self.path)

    def _load(self) -> BarmanConfig:
        try:
            loaded = load_config(self.path)
        except ConfigurationError as exc:
            log.error("%s", exc.message)
            raise
        if self._loaded_once:
            log.info("Barman configuration '%s' changed: reloaded", self.path)
        self._loaded_once = True
        return loaded


def _has(dotted: str) -> bool:
    """Whether Barman's Python API has *dotted* (`barman.server.Server.get_last_backup_id`)."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


@lru_cache(maxsize=1)
def features() -> barman_features.BarmanFeatures:
    """The running Barman's features: its version, and Barman's API probed where a feature lives in it."""
    return barman_features.from_version(barman.__version__,
                                        {f.key: _has(f.probe) for f in barman_features.FEATURES if f.probe})


def check_supported() -> None:
    """Raise UnsupportedBarman (one line) for a Barman outside the range the service supports."""
    barman_features.check_supported()


def check_request(op_type: str, fields: Mapping[str, Any]) -> None:
    """Refuse (422, naming the feature and the Barman it needs) what the running Barman cannot do."""
    features().require_for_request(op_type, fields)


def _server(server_config: Any) -> Any:
    return barman_config.barman_server(server_config)


def preload() -> None:
    """Import what reading a catalogue needs (50 ms) at start-up rather than in a request."""
    import barman.server  # noqa: F401


@dataclass(frozen=True)
class Backup:
    backup_id: str
    status: str
    end_time: Optional[datetime]
    tablespaces: Tuple[str, ...]
    # Where each tablespace was on the source: Barman restores it there unless relocated.
    tablespace_locations: Tuple[Tuple[str, str], ...] = ()
    # Compressed, encrypted or incremental: Barman prepares it in a staging area first.
    needs_staging: bool = False


@dataclass(frozen=True)
class CorruptBackup:
    """A backup whose backup.info Barman cannot read: every barman command of its server fails on it."""

    backup_id: str
    path: str
    reason: str


CORRUPT = "CORRUPT"  # the status a corrupt backup is listed with, beside Barman's own
INFO_SUFFIX = "-backup.info"


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{exc.__class__.__name__}: {exc}"


def _read_backups(server: Any) -> Tuple[Dict[str, Any], Dict[str, CorruptBackup]]:
    """Every backup of the catalogue (any status), and those whose backup.info cannot be read.

    Barman's listing stops at the first backup.info it cannot read; then each is read on its own, from
    where Barman reads them (`base/<id>/backup.info`, then `meta/<id>-backup.info`, which wins).
    """
    try:
        return server.get_available_backups(status_filter=BackupInfo.STATUS_ALL), {}
    except Exception as exc:  # anything one file makes Barman raise
        failure = exc
    from barman.infofile import BackupInfoFactory

    legacy = [(p, os.path.basename(os.path.dirname(p)))
              for p in sorted(glob(f"{server.config.basebackups_directory}/*/backup.info"))]
    meta = [(p, os.path.basename(p)[:-len(INFO_SUFFIX)])
            for p in sorted(glob(f"{server.meta_directory}/*{INFO_SUFFIX}"))]
    found: Dict[str, Any] = {}
    corrupt: Dict[str, CorruptBackup] = {}
    for path, backup_id in legacy + meta:
        try:
            info = BackupInfoFactory.build_backup_info(server, path)
        except Exception as exc:
            corrupt.setdefault(backup_id, CorruptBackup(backup_id, path, _why(exc)))
            continue
        found[info.backup_id] = info
    if not corrupt:  # no file explains it: not ours to hide
        raise failure
    return {i: b for i, b in found.items() if i not in corrupt}, corrupt


def _refuse_corrupt(server_config: Any, requested: str, corrupt: Dict[str, CorruptBackup], doing: str) -> None:
    """Barman reads every backup.info of a server before it restores or shows any of its backups."""
    if not corrupt:
        return
    if requested in corrupt:
        bad = corrupt[requested]
        raise Unprocessable(f"backup '{bad.backup_id}' of server '{server_config.name}' is corrupt: Barman cannot "
                            f"read {bad.path} ({bad.reason}); repair it or move it aside")
    bad = corrupt[min(corrupt)]
    raise Unprocessable(f"server '{server_config.name}' has a corrupt backup '{bad.backup_id}': Barman cannot read "
                        f"{bad.path} ({bad.reason}), and {doing} of any backup of server '{server_config.name}' "
                        "fails until it is repaired or moved aside")


def _backup(info: Any) -> Backup:
    end = info.end_time
    if end is not None and end.tzinfo is None:
        end = end.astimezone()  # Barman writes local times; make them comparable
    tablespaces = tuple(info.tablespaces or ())
    staged = (getattr(info, "compression", None) is not None or getattr(info, "encryption", None) is not None
              or bool(getattr(info, "is_incremental", False)))
    return Backup(info.backup_id, info.status, end, tuple(t.name for t in tablespaces),
                  tuple((t.name, t.location) for t in tablespaces), staged)


def _lookup(server: Any, backups: Dict[str, Any], requested: str, target_time: Optional[str] = None,
            target_lsn: Optional[str] = None) -> Optional[str]:
    """The id *requested* names: an alias (matched exactly), `auto`, an id or a backup name."""
    if requested in LATEST:
        return server.get_last_backup_id()
    if requested in OLDEST:
        return server.get_first_backup_id()
    if requested in LATEST_FULL:
        return _last_full(backups)
    if requested in LAST_FAILED:
        return server.get_last_backup_id([BackupInfo.FAILED])
    if requested == AUTO and (target_time or target_lsn):
        features().require("auto")
    if requested == AUTO and target_time:
        return server.get_closest_backup_id_from_target_time(target_time, None)
    if requested == AUTO and target_lsn:
        return server.get_closest_backup_id_from_target_lsn(target_lsn, None)
    if requested in backups:
        return requested
    named = [b.backup_id for b in backups.values() if getattr(b, "backup_name", None) == requested]
    return named[0] if len(named) == 1 else None


def _is_full(info: Any) -> bool:
    """Not incremental, not a snapshot: Barman >= 3.13.1's `is_full`, which older ones lack or apply otherwise."""
    if getattr(info, "backup_type", None) in ("incremental", "snapshot"):
        return False
    return not getattr(info, "snapshots_info", None)  # Barman < 3.11 has snapshots, but no backup_type


def _last_full(backups: Dict[str, Any]) -> Optional[str]:
    """`latest-full` as Barman >= 3.13.1 reads it, on every Barman: the newest recoverable full backup.

    Barman 3.11 to 3.13.0 count only a full backup that can parent an incremental one (and older ones
    have no such alias): the id is resolved here and barman is given the id, so every version agrees.
    """
    full = [i for i, b in backups.items() if b.status in RECOVERABLE and _is_full(b)]
    return max(full) if full else None


def resolve_backup(server_config: Any, requested: str, target_time: Optional[str] = None,
                   target_lsn: Optional[str] = None) -> Backup:
    """The concrete backup a recovery of *requested* would use now; it must be recoverable."""
    if requested in LAST_FAILED:
        raise Unprocessable("backup_id 'last-failed' names a failed backup, which cannot be recovered")
    server = _server(server_config)
    backups, corrupt = _read_backups(server)
    _refuse_corrupt(server_config, requested, corrupt, "every barman restore")
    backup_id = _lookup(server, backups, requested, target_time, target_lsn)
    if backup_id is None or backup_id not in backups:
        raise NoSuchBackup(
            f"backup_id '{requested}' matches no backup of server '{server_config.name}'"
            + (" that ends before the recovery target" if requested == AUTO else "")
        )
    status = backups[backup_id].status
    if status not in RECOVERABLE:
        raise Unprocessable(
            f"backup '{backup_id}' of server '{server_config.name}' has status {status}: "
            f"only a backup with status {' or '.join(RECOVERABLE)} can be recovered"
        )
    return _backup(backups[backup_id])


def check_recovery_against_backup(fields: Dict[str, Any], backup: Backup) -> None:
    """What only the chosen backup can tell: the target is after its end, its tablespaces exist."""
    target_time = fields.get("target_time")
    if target_time and backup.end_time is not None:
        target = datetime.fromisoformat(target_time.replace("Z", "+00:00"))
        if target < backup.end_time:
            raise Unprocessable(
                f"field 'target_time': {target_time} is before the end of backup {backup.backup_id} "
                f"({backup.end_time.isoformat()}); choose an earlier backup or a later target")
    unknown = sorted(set(fields.get("tablespaces") or {}) - set(backup.tablespaces))
    if unknown:
        raise InvalidRequest(
            f"field 'tablespaces': {', '.join(unknown)} not in backup {backup.backup_id} "
            f"(it has: {', '.join(backup.tablespaces) or 'no tablespaces'})")


def pg_binaries(server_config: Any) -> Tuple[str, ...]:
    """The directories of the server's `path_prefix`: where its PostgreSQL binaries are."""
    return tuple(p for p in (getattr(server_config, "path_prefix", None) or "").split(os.pathsep) if p)


def remote_staging_path(server_config: Any, backup: Backup) -> Optional[str]:
    """The `staging_path` Barman creates sub-directories in on the target host for *backup*, if any."""
    if not backup.needs_staging or getattr(server_config, "staging_location", None) != "remote":
        return None
    return getattr(server_config, "staging_path", None) or None


def barman_json(config_path: str, *args: str, timeout: float = 120, json_format: bool = True) -> Any:
    """Run a read-only barman command in its own process and parse the JSON it prints.

    A separate process keeps Barman's global output state (and any memory it holds) out of
    the service, and a slow PostgreSQL connection cannot stall more than this request.
    """
    argv = [barman_executable(), "-c", config_path, *(["-f", "json"] if json_format else []), *args]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BarmanUnavailable(f"barman {args[0]} did not answer within {timeout:.0f} s") from None
    try:
        document = json.loads(proc.stdout)
    except ValueError:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise BarmanUnavailable(f"barman {args[0]} failed (exit code {proc.returncode}): "
                                f"{detail[-1] if detail else 'no output'}") from None
    # Barman's JSON writer reports its own errors inside the document, under these keys.
    found = document if isinstance(document, dict) else {}
    errors = [str(m).split("\n")[0] for key in ("_ERROR", "_EXCEPTION") for m in found.get(key, [])]
    if errors:
        raise BarmanUnavailable(f"barman {args[0]} failed: {'; '.join(errors)}")
    return document


def _json_document(text: str) -> Any:
    """The first JSON object that starts a line of *text* (Barman may print other lines around it), or None."""
    decoder = json.JSONDecoder()
    for start in re.finditer(r"^\{", text, re.MULTILINE):
        try:
            return decoder.raw_decode(text, start.start())[0]
        except ValueError:
            continue
    return None


def diagnose(config_path: str, timeout: float = 120) -> Dict[str, Any]:
    """Barman's `diagnose` document whenever Barman printed one, whatever its exit code; else BarmanNoDocument."""
    # The document holds each server's own errors (a PostgreSQL that is down among them): they are no
    # failure of the request.
    # `diagnose` prints its JSON document itself; `-f json` would wrap it in a string.
    argv = [barman_executable(), "-c", config_path, "diagnose"]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BarmanNoDocument(f"barman diagnose did not answer within {timeout:.0f} s") from None
    document = _json_document(proc.stdout)
    if isinstance(document, dict):
        if proc.returncode:
            log.warning("barman diagnose exited with code %s: %s", proc.returncode,
                        "; ".join(errors_in(proc.stderr)) or "no error line")
        return document
    lines = errors_in(proc.stderr + "\n" + proc.stdout)
    if not lines:
        lines = [line.strip()[:400] for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][:3]
    raise BarmanNoDocument(f"barman diagnose printed no document (exit code {proc.returncode}): "
                           f"{'; '.join(lines) or 'no output'}")


def server_summary(config: BarmanConfig, name: str) -> Dict[str, Any]:
    """A server as `barman show-servers` shows it: `disabled` and `errors` (its msg_list) are Barman's Server's."""
    server_config = config.server(name)
    verdict = config.verdict(name)
    return {
        "name": server_config.name,
        "description": server_config.description,
        "active": bool(server_config.active),
        "disabled": verdict.disabled,
        "backup_method": server_config.backup_method,
        "active_model": getattr(server_config, "active_model", None) and server_config.active_model.name,
        "errors": list(verdict.messages),
    }


def _time(moment: Optional[datetime]) -> Optional[str]:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.astimezone()).isoformat()


def backup_summary(info: Any) -> Dict[str, Any]:
    return {
        "backup_id": info.backup_id,
        "name": getattr(info, "backup_name", None),
        "status": info.status,
        "backup_type": getattr(info, "backup_type", None),
        "begin_time": _time(info.begin_time),
        "end_time": _time(info.end_time),
        "size_bytes": info.size,
        "begin_wal": info.begin_wal,
        "end_wal": info.end_wal,
        "timeline": info.timeline,
        "parent_backup_id": getattr(info, "parent_backup_id", None),
    }


def corrupt_summary(bad: CorruptBackup) -> Dict[str, Any]:
    return {"backup_id": bad.backup_id, "name": None, "status": CORRUPT, "backup_type": None, "begin_time": None,
            "end_time": None, "size_bytes": None, "begin_wal": None, "end_wal": None, "timeline": None,
            "parent_backup_id": None, "corrupt_file": bad.path, "reason": bad.reason}


def list_backups(server_config: Any) -> List[Dict[str, Any]]:
    """Every backup in the catalogue, oldest first, whatever its status; an unreadable one as CORRUPT."""
    backups, corrupt = _read_backups(_server(server_config))
    listed = {**{i: backup_summary(b) for i, b in backups.items()},
              **{i: corrupt_summary(b) for i, b in corrupt.items()}}
    return [listed[i] for i in sorted(listed)]


def find_backup(server_config: Any, requested: str) -> str:
    """The id *requested* names, whatever the backup's status (for reading it)."""
    server = _server(server_config)
    backups, corrupt = _read_backups(server)
    _refuse_corrupt(server_config, requested, corrupt, "every barman show-backup")
    backup_id = _lookup(server, backups, requested)
    if backup_id is None or backup_id not in backups:
        raise NoSuchBackup(f"backup '{requested}' matches no backup of server '{server_config.name}'")
    return backup_id


def prove_config_changes(config: BarmanConfig, changes: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A config_update's changes, proven on a scratch copy of the configuration (see barman_config)."""
    return barman_config.prove_changes(config.config, changes)


def prove_config_switch(config: BarmanConfig, server: str, model: Optional[str]) -> None:
    """Refuse a config_switch to *model* (None: a reset) that Barman's Server of *server* would not survive."""
    config.server(server)
    barman_config.prove_switch(config.config, server, model)


def config_changes_queue(config: BarmanConfig, running: bool) -> Dict[str, Any]:
    """Barman's queue of configuration changes: its path, how many wait, whether it is stuck."""
    return barman_config.queue_state(config.config, running)


def describe_config_changes_queue(config: BarmanConfig) -> str:
    return barman_config.describe_queue(barman_config.queue_path(config.config))


def snapshot_config_changes_queue(config: BarmanConfig) -> barman_config.QueueSnapshot:
    return barman_config.QueueSnapshot.take(config.config)


# -- the catalogue as numbers, for /metrics and the web page -------------------------------------

@dataclass(frozen=True)
class CatalogueBackup:
    """One backup of the catalogue, in plain numbers (times are epoch seconds)."""

    backup_id: str
    name: Optional[str]
    status: str
    begin: Optional[float]
    end: Optional[float]
    size: int
    wal_size: int  # the WAL archived from this backup's start until the next backup's end, as list-backups says
    copy_time: float


@dataclass(frozen=True)
class Catalogue:
    """What a server's catalogue says: backups oldest first (every status), the last archived WAL."""

    backups: Tuple[CatalogueBackup, ...]
    last_wal_time: Optional[float]
    last_backup_maximum_age: Optional[float]  # seconds, Barman's `last_backup_maximum_age`


def _xlogdb_path(server_config: Any) -> str:
    directory = getattr(server_config, "xlogdb_directory", None) or server_config.wals_directory
    return os.path.join(directory, f"{server_config.name}-xlog.db")


def catalogue_key(server_config: Any) -> Tuple[Any, ...]:
    """What changes whenever the catalogue does: the meta folder's entries and stats, the legacy
    base folder's listing and the WAL catalogue (xlog.db); a few stat calls, no parsing."""
    entries: List[Tuple[str, int, int]] = []
    meta = os.path.join(server_config.backup_directory, "meta")
    for directory in (meta, server_config.basebackups_directory):
        try:
            with os.scandir(directory) as found:
                for entry in found:
                    st = entry.stat()
                    entries.append((entry.path, st.st_mtime_ns, st.st_size))
        except OSError:
            entries.append((directory, -1, -1))
    try:
        st = os.stat(_xlogdb_path(server_config))
        entries.append(("xlog.db", st.st_mtime_ns, st.st_size))
    except OSError:
        entries.append(("xlog.db", -1, -1))
    return tuple(sorted(entries))


def _epoch(moment: Optional[datetime]) -> Optional[float]:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.astimezone()).timestamp()


def _wal_lines(path: str) -> List[Tuple[str, int, float]]:
    """(name, size, archival time) of every WAL segment in xlog.db, sorted by name."""
    from barman import xlog

    found = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or not xlog.is_wal_file(parts[0]):
                    continue
                try:
                    found.append((parts[0], int(parts[1]), float(parts[2])))
                except ValueError:
                    continue
    except OSError:
        return []
    found.sort()
    return found


def read_catalogue(server_config: Any) -> Catalogue:
    """The catalogue of one server, read once: backup.info files and one pass over xlog.db."""
    import bisect

    from barman import xlog

    infos, corrupt = _read_backups(_server(server_config))
    wals = _wal_lines(_xlogdb_path(server_config))
    names = [w[0] for w in wals]
    ordered = [infos[i] for i in sorted(infos)]
    copy_done = [b for b in ordered if b.status in RECOVERABLE]
    backups = [CatalogueBackup(b.backup_id, None, CORRUPT, None, None, 0, 0, 0.0) for b in corrupt.values()]
    for info in ordered:
        wal_size = 0
        if info.status in RECOVERABLE and info.begin_wal:
            # Barman's rule (get_wal_until_next_backup): from this backup's first WAL to the next
            # finished backup's last, on this backup's timeline or an older one.
            later = [b for b in copy_done if b.backup_id > info.backup_id]
            next_end = later[0].end_wal if later else None
            tli = xlog.decode_segment_name(info.begin_wal)[0]
            start = bisect.bisect_left(names, info.begin_wal)
            stop = bisect.bisect_right(names, next_end) if next_end else len(names)
            wal_size = sum(size for name, size, _ in wals[start:stop]
                           if xlog.decode_segment_name(name)[0] <= tli)
        copy_stats = getattr(info, "copy_stats", None) or {}
        backups.append(CatalogueBackup(
            info.backup_id, getattr(info, "backup_name", None), info.status, _epoch(info.begin_time),
            _epoch(info.end_time), int(info.size or 0), wal_size, float(copy_stats.get("copy_time") or 0)))
    backups.sort(key=lambda b: b.backup_id)
    max_age = getattr(server_config, "last_backup_maximum_age", None)
    return Catalogue(tuple(backups), max(w[2] for w in wals) if wals else None,
                     max_age.total_seconds() if max_age is not None else None)
