"""Barman's configuration as the `barman` command reads it, and configuration changes proven first.

Imported only by barman_adapter (the one module that talks to Barman). A `config_update` is
applied to a scratch copy of every configuration file, with Barman's own editing function, and
read back with Barman's own parser, and Barman's own Server is built from it (where Barman disables
a server), before the real `barman config-update` may run; Barman's queue of configuration changes
is reported, snapshotted and restored here.
"""

from __future__ import annotations

import configparser
import copy
import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from glob import iglob
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from barman.config import FORBIDDEN_SERVER_NAMES, Config, CsvOption, ServerConfig

if TYPE_CHECKING:
    from barman.config import ConfigChangeSet

from pg_backup_api.core.errors import Conflict, InvalidRequest, Unprocessable

AUTO_CONF = ".barman.auto.conf"
# Sections a config_update may never name: Barman's global section and its reserved words.
RESERVED_SECTIONS = ("barman", *FORBIDDEN_SERVER_NAMES)
CONFIG_UPDATE_LOCK = ".config-update.lock"  # barman.lockfile.ConfigUpdateLock's file
LOCK_WAIT_S = 30.0


# -- reading the configuration as `barman` does ------------------------------------------------

def autoconf_path(config: Config) -> str:
    # barman.cli.parse_global_config builds it this way (no `~` expansion) before loading it.
    return f"{config.get('barman', 'barman_home')}/{AUTO_CONF}"


def conf_dir_files(config: Config) -> List[str]:
    """The files Config.load_configuration_files_directory reads, in its order."""
    directory = config.get("barman", "configuration_files_directory")
    if not directory or not os.path.isdir(os.path.expanduser(directory)):
        return []
    return sorted(iglob(os.path.join(os.path.expanduser(directory), "*.conf")))


def read_config(path: str, conf_files: Optional[List[str]] = None, autoconf: Optional[str] = None) -> Config:
    """The configuration the `barman` command uses: main file, configuration_files_directory, then
    `.barman.auto.conf`, every section parsed (models applied). *conf_files*/*autoconf* replace the
    real ones (a scratch copy). Raises what Barman raises (SystemExit included)."""
    config = Config(path)
    if not hasattr(config, "load_config_file"):
        # Barman < 3.10 loads the directory in one call and has no `.barman.auto.conf`.
        config.load_configuration_files_directory()
        config.server_names()
        return config
    for name in conf_files if conf_files is not None else conf_dir_files(config):
        config.load_config_file(name)
    auto = autoconf if autoconf is not None else autoconf_path(config)
    if os.path.exists(auto):
        config.load_config_file(auto)
    config.server_names()  # parses every section now, as the first barman command would
    return config


def extra_files(config: Config) -> Tuple[str, ...]:
    """Files beside the main one whose change changes the configuration."""
    if not has_change_queue(config):  # Barman < 3.10 reads no `.barman.auto.conf`
        return ()
    return (os.path.expanduser(autoconf_path(config)),)


def has_change_queue(config: Config) -> bool:
    """Barman >= 3.10: configuration models, `.barman.auto.conf` and the queue of configuration changes."""
    return hasattr(config, "config_changes_queue")


def model_names(config: Config) -> List[str]:
    """The configuration's models (Barman < 3.10 has none)."""
    return sorted(config.model_names()) if hasattr(config, "model_names") else []


def probe_files(path: str) -> Tuple[Optional[str], Tuple[str, ...]]:
    """For a configuration that does not load: its conf dir and `.barman.auto.conf`, read raw."""
    raw = configparser.RawConfigParser(strict=False)
    try:
        raw.read(path)
        home = raw.get("barman", "barman_home", fallback=None)
        conf_dir = raw.get("barman", "configuration_files_directory", fallback=None)
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None, ()
    return conf_dir, ((os.path.expanduser(f"{home}/{AUTO_CONF}"),) if home else ())


# -- what Barman's Server makes of a server's configuration -------------------------------------

# Effects of a problem, as the refusal of a change states them.
DISABLED = "would be disabled by Barman (`barman cron` skips it: no WAL archiving, no backups)"
DISABLED_WHEN_REACHABLE = ("would be disabled by Barman whenever its PostgreSQL answers (`barman cron` then "
                           "skips it: no WAL archiving, no backups)")
NO_RETENTION = "would keep no retention policy (Barman ignores one it cannot parse, and `barman check` fails)"
COPIES_FAIL = "would fail every recovery and every copy of a backup"
# Barman's copy starts `parallel_jobs` processes, in batches of `parallel_jobs_start_batch_size`, and
# fails on fewer than one only when a copy runs; its Server accepts both.
AT_LEAST_ONE = {
    "parallel_jobs": "Number of processes must be at least 1",
    "parallel_jobs_start_batch_size": "IndexError: list index out of range",
}
# Barman checks a compression level against the algorithm only while PostgreSQL answers; the same
# check without asking PostgreSQL passes what depends on its version.
_PG_VERSION_NOT_ASKED = sys.maxsize


@dataclass(frozen=True)
class Verdict:
    """What Barman's Server makes of a server's configuration, as `barman show-servers` reports it."""

    disabled: bool
    messages: Tuple[str, ...]


@dataclass(frozen=True)
class Problem:
    """Something that stops a server working: what it does to the server, and Barman's message."""

    effect: str
    message: str

    def __str__(self) -> str:
        return f"{self.effect}: {self.message}"


def _copy(server_config: ServerConfig) -> ServerConfig:
    """A copy Barman's Server may change (it disables, appends messages, converts values in place)."""
    duplicate = copy.copy(server_config)
    for key, value in vars(server_config).items():
        if isinstance(value, CsvOption):
            setattr(duplicate, key, type(value)(",".join(sorted(value)), key, f"[{server_config.name}] section"))
        elif isinstance(value, (list, set, dict)):
            setattr(duplicate, key, copy.copy(value))
    return duplicate


def barman_server(server_config: ServerConfig) -> Any:
    """Barman's Server for *server_config*, as every barman command builds it, on a copy of it."""
    # On a copy: the loaded configuration stays as loaded, however many Servers are built from it.
    from barman.server import Server  # heavy import: the service preloads it, workers never need it

    return Server(_copy(server_config))


def verdict(server_config: ServerConfig) -> Verdict:
    """`disabled` and `msg_list` as Barman's Server leaves them."""
    config = barman_server(server_config).config
    return Verdict(bool(config.disabled), tuple(config.msg_list))


def problems(server_config: ServerConfig) -> List[Problem]:
    """What stops the server working: Barman's messages (each disables it), and what Barman accepts then fails on."""
    # Accepted then failed on: a retention policy Barman cannot parse, fewer than one copy process, a
    # compression level Barman checks only while PostgreSQL answers. An explicit `disabled = true` is none.
    server = barman_server(server_config)
    config = server.config
    found = [Problem(DISABLED, str(m)) for m in config.msg_list]
    if config.retention_policy and not server.enforce_retention_policies:
        found.append(Problem(NO_RETENTION, _retention_error(server)))
    for key, failure in AT_LEAST_ONE.items():
        value = getattr(config, key, None)
        if isinstance(value, int) and value < 1:
            found.append(Problem(COPIES_FAIL, f"{key} is {value}, at least 1 is needed (Barman's copy fails with "
                                              f"'{failure}')"))
    compression = getattr(server.backup_manager.executor, "backup_compression", None)
    if compression is not None:
        found += [Problem(DISABLED_WHEN_REACHABLE, issue) for issue in _compression_issues(server, compression)
                  if issue not in config.msg_list]
    return found


def _retention_error(server: Any) -> str:
    from barman.exceptions import InvalidRetentionPolicy
    from barman.retention_policies import RetentionPolicyFactory

    try:
        RetentionPolicyFactory.create("retention_policy", server.config.retention_policy, server=server)
    except InvalidRetentionPolicy as exc:
        return str(exc)
    return f"invalid retention_policy {server.config.retention_policy!r}"


def _compression_issues(server: Any, compression: Any) -> List[str]:
    """Barman's own validation of backup_compression, without PostgreSQL (only pg_basebackup's version)."""
    from barman.command_wrappers import PgBaseBackup

    version = PgBaseBackup.get_version_info(server.path)["full_version"]
    if version is None:  # no pg_basebackup: `barman check` says so, and no backup runs anyway
        return []
    try:
        return [str(i) for i in compression.validate(_PG_VERSION_NOT_ASKED, {"pg_basebackup_version": version})]
    except (KeyError, TypeError):  # a later Barman needs more of PostgreSQL's status: its own check stands
        return []


def prove_switch(config: Config, server: str, model: Optional[str]) -> None:
    """Refuse a config_switch (to *model*, a reset when None) that gives the server a problem it does not have."""
    # The server as the next barman command builds it after the switch: its section, then the model.
    switched = ServerConfig(config, server)
    field = "reset"
    if model is not None:
        field = "model_name"
        chosen = config.get_model(model)
        if chosen is None or chosen.cluster != switched.cluster:
            return  # Barman refuses it itself, with its own message
        switched.apply_model(chosen)
    before = problems(config.get_server(server))
    found = [p for p in problems(switched) if p not in before]
    if found:
        what = f"with model '{model}'" if model is not None else "without its model"
        raise Unprocessable(f"field '{field}': {what} server '{server}' "
                            f"{'; '.join(str(p) for p in found)}")


# -- Barman's queue of configuration changes -------------------------------------------------

def queue_path(config: Config) -> Optional[str]:
    """Where Barman keeps its queue of configuration changes; None before Barman 3.10, which has none."""
    return config.config_changes_queue if has_change_queue(config) else None


def read_queue(path: Optional[str]) -> List[ConfigChangeSet]:
    """The pending change sets, as ConfigChangesQueue.read_file reads them (malformed means empty)."""
    if path is None:
        return []
    from barman.config import ConfigChangeSet  # Barman >= 3.10

    try:
        with open(path) as queue:
            entries = json.load(queue, object_hook=ConfigChangeSet.from_dict)
    except FileNotFoundError:
        return []
    except ValueError:
        return []
    return entries if isinstance(entries, list) else []


def queue_state(config: Config, running: bool) -> Dict[str, Any]:
    """How many change sets wait in Barman's queue; stuck when some wait and no config_update runs."""
    path = queue_path(config)
    if path is None:
        return {"path": None, "pending": 0, "stuck": False}
    try:
        pending = len(read_queue(path))
    except OSError as exc:
        return {"path": path, "pending": None, "stuck": False, "error": exc.strerror or str(exc)}
    return {"path": path, "pending": pending, "stuck": pending > 0 and not running}


@dataclass(frozen=True)
class QueueSnapshot:
    """Barman's change queue as it was before a config_update, to put back if Barman fails."""

    path: Optional[str]  # None: this Barman has no queue
    content: Optional[bytes]  # None: there was no queue file
    lock_directory: str

    @classmethod
    def take(cls, config: Config) -> "QueueSnapshot":
        path = queue_path(config)
        try:
            content: Optional[bytes] = Path(path).read_bytes() if path is not None else None
        except FileNotFoundError:
            content = None
        return cls(path, content, config.barman_lock_directory)

    def current(self) -> Optional[bytes]:
        if self.path is None:
            return None
        try:
            return Path(self.path).read_bytes()
        except FileNotFoundError:
            return None

    def restore(self) -> bool:
        """Put the queue back as it was, under Barman's config-update lock; False if it was unchanged."""
        if self.path is None:
            return False
        with _config_update_lock(self.lock_directory):
            if self.current() == self.content:
                return False
            if self.content is None:
                os.unlink(self.path)
                return True
            tmp = f"{self.path}.pg-backup-api.tmp"
            with open(tmp, "wb") as out:
                out.write(self.content)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
            return True


class _config_update_lock:
    """Barman's own lock on the queue (barman.lockfile.ConfigUpdateLock: an flock on
    `<barman_lock_directory>/.config-update.lock`), waited for a while rather than failed at once."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, CONFIG_UPDATE_LOCK)
        self.fd: Optional[int] = None

    def __enter__(self) -> "_config_update_lock":
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK) or time.monotonic() > deadline:
                    os.close(self.fd)
                    raise
                time.sleep(0.1)

    def __exit__(self, *exc: Any) -> None:
        assert self.fd is not None
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


# -- proving a config_update on a scratch copy --------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One key of one change: where the client put it, where Barman would write it."""

    field: str  # `changes.N.key`, for error messages
    scope: str
    section: str
    key: str
    value: str
    config_file: str


def normalise_value(value: Any) -> str:
    """What Barman would write for a JSON value: it concatenates strings, so send it strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def _expected(value: str) -> Optional[str]:
    """What Barman's Config.get returns for *value* written as is (stripped, unquoted, `None`)."""
    value = value.strip()
    if value == "None":
        return None
    return Config._QUOTE_RE.sub(lambda m: m.group(2), value)


def _items(config: Config, changes: List[Dict[str, Any]]) -> List[Item]:
    """Check the section names and keys as Barman's ConfigChangesProcessor would, and more strictly."""
    items = []
    for i, change in enumerate(changes):
        scope = change["scope"]
        name_key = "server_name" if scope == "server" else "model_name"
        section = change[name_key]
        where = f"changes.{i}.{name_key}"
        if section in RESERVED_SECTIONS:
            raise InvalidRequest(f"field '{where}': '{section}' is reserved by Barman (the global section or "
                                 "a reserved word), not a server or a model")
        known = config.server_names() if scope == "server" else model_names(config)
        if section not in known:
            raise InvalidRequest(f"field '{where}': '{section}' is not a {scope} of the Barman configuration "
                                 f"({scope}s: {', '.join(sorted(known)) or 'none'})")
        from barman.config import ModelConfig  # Barman >= 3.10, as config_update is

        keys = ServerConfig.KEYS if scope == "server" else ModelConfig.KEYS
        parsers = ServerConfig.PARSERS if scope == "server" else ModelConfig.PARSERS
        for key, raw in change.items():
            if key in ("scope", name_key):
                continue
            field = f"changes.{i}.{key}"
            value = normalise_value(raw)
            if key not in keys:
                raise InvalidRequest(f"field '{field}': Barman has no option '{key}' for a {scope}")
            parser = parsers.get(key)
            try:
                if parser is not None and isinstance(parser, type) and issubclass(parser, CsvOption):
                    parser(value, key, f"{scope} '{section}'")
                elif parser is not None:
                    parser(value)
            except Exception as exc:
                raise InvalidRequest(f"field '{field}': Barman refuses {value!r}: {exc}") from None
            source = str(config._config.get_config_source(section, key))
            if source == "default":  # Barman writes a value it has no file for into .barman.auto.conf
                source = os.path.expanduser(f"{config.barman_home}/{AUTO_CONF}")
            items.append(Item(field, scope, section, key, value, source))
    return items


class _Scratch:
    """A copy of every configuration file in a temporary directory, keyed by the real path."""

    def __init__(self, root: str, config: Config) -> None:
        self.root = root
        self.copies: Dict[str, str] = {}
        self.main = self.copy(config.config_file, "main")
        self.conf_files = [self.copy(f, "barman.d") for f in conf_dir_files(config)]
        self.autoconf = self.copy(autoconf_path(config), "home")

    def copy(self, real: str, where: Optional[str] = None) -> str:
        key = os.path.abspath(os.path.expanduser(real))
        if key not in self.copies:
            directory = os.path.join(self.root, where or f"other{len(self.copies)}")
            os.makedirs(directory, exist_ok=True)
            target = os.path.join(directory, os.path.basename(key))
            if os.path.isfile(key):
                shutil.copyfile(key, target)
            self.copies[key] = target
        return self.copies[key]


def _attempt(root: str, config: Config, change_sets: List[ConfigChangeSet]) -> Tuple[Optional[Config], str]:
    """Apply *change_sets* to a fresh scratch copy as ConfigChangesProcessor.apply_change does, then
    load it: the loaded copy, or None and why Barman would fail."""
    from barman.utils import edit_config  # Barman >= 3.10, as config_update is

    scratch = _Scratch(tempfile.mkdtemp(dir=root), config)
    try:
        for change_set in change_sets:
            changed: Dict[str, List[str]] = {}
            for chg in change_set.changes_set:
                target = scratch.copy(chg.config_file)
                changed[target] = edit_config(target, change_set.section, chg.key, chg.value, changed.get(target))
                config.get(change_set.section, chg.key)  # Barman reads the old value while applying
            for target, lines in changed.items():
                with open(target, "w") as out:
                    out.writelines(lines)
        return read_config(scratch.main, scratch.conf_files, scratch.autoconf), ""
    except SystemExit as exc:
        return None, str(exc)
    except Exception as exc:
        return None, f"{exc.__class__.__name__}: {exc}"


def _change_sets(items: List[Item]) -> List[ConfigChangeSet]:
    from barman.config import ConfigChange, ConfigChangeSet

    return [ConfigChangeSet(i.section, [ConfigChange(i.key, i.value, i.config_file)]) for i in items]


def _read_back(loaded: Config, item: Item) -> Tuple[bool, str]:
    """Whether *item* still reads back as its value in *loaded*, and why not."""
    parsed = loaded.get_server(item.section) if item.scope == "server" else loaded.get_model(item.section)
    if parsed is None:
        return False, f"'{item.section}' would no longer be a {item.scope}"
    try:
        # As ServerConfig/ModelConfig read it: the section's other parsed values may be interpolated
        # (never the key itself, which configparser would take from these vars instead).
        context = {k: v for k, v in vars(parsed).items() if k != item.key}
        got = loaded.get(item.section, item.key, context, none_value=None)
    except configparser.Error as exc:
        return False, f"Barman cannot read it back: {exc}"
    if got != _expected(item.value):
        return False, f"Barman would read it back as {got!r}"
    return True, ""


def _writable(path: str) -> bool:
    if os.path.exists(path):
        return os.access(path, os.W_OK)
    return os.access(os.path.dirname(path) or ".", os.W_OK)


def prove_changes(config: Config, changes: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Refuse a config_update Barman would fail to apply or that would break its configuration.

    Returns the changes with every value as the string Barman will write. The pending queue is
    applied first, as `barman config-update` applies it before the new changes.
    """
    items = _items(config, changes)
    try:
        pending = read_queue(queue_path(config))
    except OSError as exc:
        raise Conflict(f"Barman's configuration change queue {queue_path(config)} cannot be read: "
                       f"{exc.strerror or exc}; Barman would fail the same way") from None
    with tempfile.TemporaryDirectory(prefix="pg-backup-api-config-") as root:
        if pending:
            files = {c.config_file for s in pending for c in getattr(s, "changes_set", ())}
            unwritable = sorted(f for f in files if not _writable(f))
            loaded, why = _attempt(root, config, pending)
            if unwritable:
                loaded, why = None, f"cannot write {', '.join(unwritable)}"
            if loaded is None:
                raise Conflict(f"Barman's configuration change queue {queue_path(config)} holds {len(pending)} "
                               f"change set(s) Barman cannot apply ({why}): every config-update and barman cron "
                               "fails until it is fixed; see `pg-backup-api doctor`")
        new = _change_sets(items)
        loaded, why = _attempt(root, config, pending + new)
        if loaded is None:
            # Name the first key whose change breaks the configuration.
            culprit = items[_first_failing(len(new), lambda k: _attempt(root, config, pending + new[:k])[0] is None)
                            - 1]
            raise InvalidRequest(f"field '{culprit.field}': with {culprit.value!r} Barman's configuration would "
                                 f"no longer load: {_hint(culprit.value, why)}")
        last = {(i.section, i.key): i for i in items}  # a key changed twice ends with its last value
        for item in last.values():
            ok, why = _read_back(loaded, item)
            if not ok:
                raise InvalidRequest(f"field '{item.field}': {item.value!r} does not survive Barman's "
                                     f"configuration parser: {_hint(item.value, why)}")
        _refuse_new_problems(root, config, pending, new, items, loaded)
    for item in items:  # last: a bad value is the client's to fix whatever the file's owner
        if not _writable(item.config_file):
            raise Unprocessable(f"field '{item.field}': Barman would write it into {item.config_file}, "
                                f"which this user cannot write")
    result = []
    for change in changes:
        name_keys = ("scope", "server_name", "model_name")
        result.append({k: (v if k in name_keys else normalise_value(v)) for k, v in change.items()})
    return result


def _first_failing(count: int, fails: Callable[[int], bool]) -> int:
    """The smallest k in 1..*count* with fails(k), knowing fails(count) and not fails(0)."""
    low, high = 0, count
    while high - low > 1:
        middle = (low + high) // 2
        if fails(middle):
            high = middle
        else:
            low = middle
    return high


def _affected(loaded: Config, items: List[Item]) -> List[str]:
    """The servers the changes reach: those changed, and those whose active model is changed."""
    servers = {i.section for i in items if i.scope == "server"}
    models = {i.section for i in items if i.scope == "model"}
    return sorted(s.name for s in loaded.servers()
                  if s.name in servers or (s.active_model is not None and s.active_model.name in models))


def _refuse_new_problems(root: str, config: Config, pending: List[ConfigChangeSet], new: List[ConfigChangeSet],
                         items: List[Item], loaded: Config) -> None:
    """Build Barman's Server of every server the changes reach, from the copy as it is with and without
    them: refuse the first change that gives one a problem it did not have (see `problems`)."""
    baseline = _attempt(root, config, pending)[0]
    if baseline is None:  # the queue was proven to load above; the configuration itself loaded
        return
    for name in _affected(loaded, items):
        before = problems(baseline.get_server(name))
        found = [p for p in problems(loaded.get_server(name)) if p not in before]
        if not found:
            continue

        def breaks(k: int, name: str = name, before: List[Problem] = before) -> bool:
            prefix = _attempt(root, config, pending + new[:k])[0]
            return prefix is None or any(p not in before for p in problems(prefix.get_server(name)))

        culprit = items[_first_failing(len(new), breaks) - 1]
        raise Unprocessable(f"field '{culprit.field}': with {culprit.value!r} server '{name}' "
                            f"{'; '.join(str(p) for p in found)}")


def _hint(value: str, why: str) -> str:
    if "%" in value:
        return f"{why} ('%' is not allowed: Barman's parser expands it)"
    return why


def describe_queue(path: Optional[str]) -> str:
    """The pending change sets, one line each, for people."""
    if path is None:
        return ""
    from barman.config import ConfigChangeSet, ConfigChangeSetEncoder

    lines = []
    for change_set in read_queue(path):
        if isinstance(change_set, ConfigChangeSet):
            keys = ", ".join(f"{c.key} = {c.value!r} -> {c.config_file}" for c in change_set.changes_set)
            lines.append(f"[{change_set.section}] {keys}")
        else:
            lines.append(json.dumps(change_set, cls=ConfigChangeSetEncoder))
    return "\n".join(lines)
