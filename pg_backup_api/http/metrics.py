"""GET /metrics: Barman's catalogue, `barman check` and the operations, in Prometheus' text format.

The names and labels of prometheus-barman-exporter come first, so its Grafana dashboard works
unchanged; this service's own metrics are prefixed `pgba_`. Everything is derived from files
(the catalogue, the operation files, the check results), never from counters in a process, so
every gunicorn worker answers the same numbers.

Cheap enough to scrape every 15 s: a server's catalogue is read again only when a stat of its
files changes, how an operation ended is read once (by the store's operation index: output files
are write-once), and `barman check` (which connects to PostgreSQL) runs in a detached process at
most every `check_interval` seconds, its results kept in a file; a scrape never waits for it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from pg_backup_api.barman_io import adapter as barman_adapter
from pg_backup_api.core.errors import ApiError
from pg_backup_api.core.model import State, Status, state_of, status_of
from pg_backup_api.service.use_cases import Listed
from pg_backup_api.store.jobs import OperationStore, Record, write_json_atomic

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_DIR = ".metrics"
CHECKS_FILE = "checks.json"
CATALOGUES_FILE = "catalogues.json"
PENDING_FILE = "checks.pending"
# Seconds: from a second to a day, the span of Barman's operations.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
INSTANCE = ""  # the `server` label of Barman-instance operations (config_update)


@dataclass(frozen=True)
class Ended:
    """How one ended operation ended: what the duration histogram needs."""

    op_type: str
    state: str
    duration: Optional[float]


class OperationFacts:
    """The operation counts and durations of one store, worked out again only when its listing changes.

    How each operation ended comes from the store's index (`OperationIndex.ends`), which reads each
    output file once and keeps what it read for the next process; each is counted in the state its
    status shows (operations.state_of), so a corrupt one is `corrupt`, not running."""

    def __init__(self) -> None:
        self._key: Tuple[Any, ...] = ()
        self._result: Tuple[Dict[Tuple[str, str], int], List[Ended], int] = ({}, [], 0)

    def read(self, store: OperationStore, listed: Listed) -> Tuple[Dict[Tuple[str, str], int], List[Ended], int]:
        """({(type, state): count}, every ended operation, how many are in progress), for this listing."""
        # The store hands out the same list objects while its folders are unchanged: hold them so
        # their ids stay theirs, and compare by identity.
        key = (listed.listing, listed.pending, listed.problems)
        if (len(self._key) == 3 and self._key[0] is key[0] and self._key[1] is key[1]
                and self._key[2] == key[2]):
            return self._result
        running = set(listed.pending)
        counts: Dict[Tuple[str, str], int] = {}
        ended: List[Ended] = []
        in_progress = 0
        types = {op["id"]: op["type"] for op in listed.listing.operations()}
        ends = store.index.ends([op_id for op_id in types if op_id not in running])
        # The index shares one summary dict between equal ends: the rule runs once per distinct one.
        seen: Dict[Tuple[int, int], Tuple[str, bool]] = {}
        for op_id, op_type in types.items():
            end = None if op_id in running else ends.get(op_id)
            if end is None and op_id not in running:
                continue  # removed (pruned) meanwhile
            problem = listed.problems.get(op_id)
            summary = end.summary if end is not None else None
            key = (id(summary), id(problem))
            if key not in seen:
                record = Record(op_id, {}, summary, problem)
                seen[key] = (state_of(record).value, status_of(record) is Status.IN_PROGRESS)
            state, live = seen[key]
            counts[(op_type, state)] = counts.get((op_type, state), 0) + 1
            in_progress += live
            if end is not None and problem is None:
                ended.append(Ended(op_type, state, end.duration))
        self._key = key
        self._result = (counts, ended, in_progress)
        return self._result


class CheckResults:
    """`barman check` of every server, as the last detached refresh left it in a file."""

    def __init__(self) -> None:
        self._cache: Tuple[Optional[Tuple[int, int]], Dict[str, Any]] = (None, {})

    def read(self, path: Path) -> Dict[str, Any]:
        try:
            st = path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        if self._cache[0] == stamp:
            return self._cache[1]
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("metrics: unreadable check results %s: %s", path, exc)
            data = {}
        self._cache = (stamp, data if isinstance(data, dict) else {})
        return self._cache[1]


def metrics_dir(barman_home: Path) -> Path:
    return barman_home / "jobs" / METRICS_DIR


def request_check_refresh(barman_home: Path, barman_conf: str, interval: float, timeout: float,
                          now: Optional[float] = None) -> bool:
    """Start a detached `barman check` refresh if the results are older than *interval* and none
    runs; True if one was started. Safe across threads and gunicorn workers: the pending file is
    created exclusively, and one left by a refresh that died is taken over after it timed out."""
    now = time.time() if now is None else now
    directory = metrics_dir(barman_home)
    results = directory / CHECKS_FILE
    try:
        if now - results.stat().st_mtime < interval:
            return False
    except FileNotFoundError:
        pass
    pending = directory / PENDING_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(pending, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
        except FileExistsError:
            if now - pending.stat().st_mtime < timeout + 30:
                return False
            pending.unlink()  # left by a refresh that died: retry
            fd = os.open(pending, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
        os.close(fd)
    except (FileExistsError, FileNotFoundError):
        return False  # another worker won the race
    except OSError as exc:
        log.warning("metrics: cannot request a barman check refresh in %s: %s", directory, exc.strerror)
        return False
    try:
        spawn_refresh(barman_conf)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("metrics: cannot start the barman check refresh: %s", exc)
        pending.unlink(missing_ok=True)
        return False
    return True


def spawn_refresh(barman_conf: str) -> None:
    """Start `pg-backup-api refresh-checks` detached, as operation workers are (see runner)."""
    argv = ["setsid", "--fork", sys.executable, "-m", "pg_backup_api", "refresh-checks"]
    env = {**os.environ, "PG_BACKUP_API_BARMAN_CONF": barman_conf}
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env, close_fds=True, check=True, timeout=10)


def refresh_checks(barman_conf: str, timeout: float) -> int:
    """The detached refresh: run `barman check all` once and write its results; exit status."""
    config = barman_adapter.load_config(barman_conf)
    directory = metrics_dir(config.barman_home)
    started = time.time()
    try:
        result = barman_adapter.barman_json(config.path, "check", "all", timeout=timeout)
        servers = {name: {check: 1 if item.get("status") == "OK" else 0 for check, item in checks.items()}
                   for name, checks in result.items() if isinstance(checks, dict)}
        document: Dict[str, Any] = {"time": started, "duration_s": time.time() - started, "servers": servers}
        status = 0
    except ApiError as exc:
        log.error("barman check refresh failed: %s", exc.message)
        document = {"time": started, "duration_s": time.time() - started, "servers": {}, "error": exc.message}
        status = 1
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(directory / CHECKS_FILE, document, exclusive=False)
    finally:
        (directory / PENDING_FILE).unlink(missing_ok=True)
    return status


class CatalogueCache:
    """Each server's catalogue, read again only when `catalogue_key` changes.

    With *path*, the catalogues are also kept in that file with their keys, so a worker that starts
    reads Barman's files only for servers whose catalogue changed meanwhile. Only a cache: a file
    unreadable or odd is ignored.
    """

    def __init__(self, path: Optional[Callable[[], Path]] = None) -> None:
        self._entries: Dict[str, Tuple[Tuple[Any, ...], barman_adapter.Catalogue]] = {}
        self._lock = threading.Lock()
        self._where = path  # asked at the first read: the configuration may not be readable at start
        self._path: Optional[Path] = None
        self._persisted: Optional[Dict[str, Any]] = None

    def get(self, server_config: Any) -> barman_adapter.Catalogue:
        key = barman_adapter.catalogue_key(server_config)
        cached = self._entries.get(server_config.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        with self._lock:
            catalogue = self._from_file(server_config, key)
            if catalogue is None:
                catalogue = barman_adapter.read_catalogue(server_config)
                self._save(server_config.name, key, catalogue)
            self._entries[server_config.name] = (key, catalogue)
        return catalogue

    def _from_file(self, server_config: Any, key: Tuple[Any, ...]) -> Optional[barman_adapter.Catalogue]:
        if self._where is None:
            return None
        if self._persisted is None:
            self._path = self._where()
            try:
                data = json.loads(self._path.read_text())
                self._persisted = data if isinstance(data, dict) else {}
            except FileNotFoundError:
                self._persisted = {}
            except (OSError, ValueError) as exc:
                log.warning("metrics: ignoring %s: %s", self._path, exc)
                self._persisted = {}
        entry = self._persisted.get(server_config.name)
        if not isinstance(entry, dict) or entry.get("key") != _json_key(key):
            return None
        try:
            backups = tuple(barman_adapter.CatalogueBackup(*item) for item in entry["backups"])
            last_wal = entry["last_wal_time"]
        except (KeyError, TypeError):
            return None
        # Barman's setting comes from the configuration, which the key does not cover: read it now.
        max_age = getattr(server_config, "last_backup_maximum_age", None)
        return barman_adapter.Catalogue(backups, last_wal, max_age.total_seconds() if max_age is not None else None)

    def _save(self, server: str, key: Tuple[Any, ...], catalogue: barman_adapter.Catalogue) -> None:
        if self._path is None or self._persisted is None:
            return
        self._persisted[server] = {"key": _json_key(key), "last_wal_time": catalogue.last_wal_time,
                                   "backups": [list(astuple(b)) for b in catalogue.backups]}
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self._path, self._persisted, exclusive=False)
        except OSError as exc:
            log.warning("metrics: cannot save %s: %s", self._path, exc.strerror or exc)


def _json_key(key: Tuple[Any, ...]) -> List[Any]:
    """The key as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(key))


class Metrics:
    """The collector behind GET /metrics, one per application (per gunicorn worker)."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.catalogues = CatalogueCache(lambda: metrics_dir(service.config_source.get().barman_home) / CATALOGUES_FILE)
        self.checks = CheckResults()
        self._operations: Dict[Optional[str], OperationFacts] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        service = self.service
        config = service.config_source.get()
        settings = service.settings
        request_check_refresh(config.barman_home, config.path, settings.check_interval, settings.check_timeout)
        now = time.time()
        yield from self._barman(config, now)
        yield from self._operations_metrics([None, *config.server_names])
        yield from self._config_changes()
        yield from self._barman_info()

    def _barman_info(self) -> Iterable[Metric]:
        barman = self.service.discovery.barman()
        info = GaugeMetricFamily("pgba_barman_info", "The Barman this host runs (always 1); `lacks` lists the API's "
                                 "features it lacks", labels=["version", "lacks"])
        info.add_metric([barman["version"], ",".join(f["feature"] for f in barman["lacks"])], 1)
        yield info

    # -- the exporter's metrics ----------------------------------------------------------------

    def _barman(self, config: Any, now: float) -> Iterable[Metric]:
        size = GaugeMetricFamily("barman_backups_size", "Size of available backups", labels=["number", "server"])
        wal = GaugeMetricFamily("barman_backups_wal_size", "WAL size of available backups",
                                labels=["number", "server"])
        total = GaugeMetricFamily("barman_backups_total", "Total number of backups", labels=["server"])
        failed = GaugeMetricFamily("barman_backups_failed", "Number of failed backups", labels=["server"])
        corrupt = GaugeMetricFamily("pgba_backups_corrupt",
                                    "Backups whose backup.info Barman cannot read (every barman command of the "
                                    "server fails on them)", labels=["server"])
        last = GaugeMetricFamily("barman_last_backup", "Last successful backup timestamp", labels=["server"])
        first = GaugeMetricFamily("barman_first_backup", "First successful backup timestamp", labels=["server"])
        copy_time = GaugeMetricFamily("barman_last_backup_copy_time", "Last successful backup copy time",
                                      labels=["server"])
        up = GaugeMetricFamily("barman_up", "Barman status checks", labels=["check", "server"])
        updated = GaugeMetricFamily("barman_metrics_update", "Barman metrics update timestamp", labels=["server"])
        window_start = GaugeMetricFamily(
            "pgba_recovery_window_start_timestamp_seconds",
            "Earliest time a recovery can reach: the begin time of the oldest successful backup", labels=["server"])
        window_end = GaugeMetricFamily(
            "pgba_recovery_window_end_timestamp_seconds",
            "Latest time a recovery can reach: when the last WAL segment was archived", labels=["server"])
        age = GaugeMetricFamily("pgba_last_successful_backup_age_seconds",
                                "Seconds since the end of the last successful backup", labels=["server"])
        check_time = GaugeMetricFamily("pgba_check_timestamp_seconds",
                                       "When the barman check results were taken (refreshed in the background)")
        checks = self.checks.read(metrics_dir(config.barman_home) / CHECKS_FILE)
        if isinstance(checks.get("time"), (int, float)):
            check_time.add_metric([], checks["time"])
        checked = checks.get("servers") if isinstance(checks.get("servers"), dict) else {}
        for name in config.server_names:
            try:
                catalogue = self.catalogues.get(config.server(name))
            except Exception as exc:  # one unreadable catalogue must not hide the others
                log.warning("metrics: cannot read the catalogue of server %s: %s", name, exc)
                continue
            done = [b for b in catalogue.backups if b.status == "DONE"]
            total.add_metric([name], len(done) + sum(b.status == "FAILED" for b in catalogue.backups))
            failed.add_metric([name], sum(b.status == "FAILED" for b in catalogue.backups))
            corrupt.add_metric([name], sum(b.status == barman_adapter.CORRUPT for b in catalogue.backups))
            # number 1 is the newest successful backup, as the exporter numbers them.
            for number, backup in enumerate(reversed(done), 1):
                size.add_metric([str(number), name], backup.size)
                wal.add_metric([str(number), name], backup.wal_size)
            copy_time.add_metric([name], done[-1].copy_time if done else 0)
            if done:
                # The exporter reads these from the backup ids, which are their begin times.
                last.add_metric([name], done[-1].begin or 0)
                first.add_metric([name], done[0].begin or 0)
                window_start.add_metric([name], done[0].begin or 0)
                if done[-1].end is not None:
                    age.add_metric([name], max(0.0, now - done[-1].end))
                latest = max(filter(None, [catalogue.last_wal_time, done[-1].end]), default=None)
                if latest is not None:
                    window_end.add_metric([name], latest)
            for check, value in sorted((checked.get(name) or {}).items()):
                up.add_metric([check, name], value)
            updated.add_metric([name], now)
        return [size, wal, total, failed, corrupt, last, first, copy_time, up, updated, window_start, window_end, age,
                check_time]

    def _config_changes(self) -> Iterable[Metric]:
        """Barman's queue of configuration changes, as GET /servers reports it (one small file read)."""
        pending = GaugeMetricFamily("pgba_config_changes_pending",
                                    "Change sets waiting in Barman's config change queue")
        stuck = GaugeMetricFamily("pgba_config_changes_stuck",
                                  "1 when change sets wait in the queue and no config_update runs to apply them")
        queue = self.service.discovery.config_changes_queue()
        # An unreadable queue has no count: both gauges are left out rather than reported as 0.
        if queue.get("pending") is not None:
            pending.add_metric([], queue["pending"])
            stuck.add_metric([], 1 if queue["stuck"] else 0)
        return [pending, stuck]

    # -- this service's operations ---------------------------------------------------------------

    def _operations_metrics(self, servers: List[Optional[str]]) -> Iterable[Metric]:
        by_state = GaugeMetricFamily("pgba_operations", "Operations on disk, by server, type and state",
                                     labels=["server", "type", "state"])
        running = GaugeMetricFamily("pgba_operations_in_progress", "Operations running now", labels=["server"])
        lost = GaugeMetricFamily("pgba_operations_lost",
                                 "Operations whose worker died without recording an end", labels=["server"])
        durations: Dict[Tuple[str, str], List[float]] = {}
        for server in servers:
            try:
                store = self.service._store(server)
                listed = self.service.listed(server)
            except ApiError as exc:
                log.warning("metrics: cannot list the operations of %s: %s", server or "the instance", exc.message)
                continue
            label = server or INSTANCE
            facts = self._operations.setdefault(server, OperationFacts())
            counts, ended, in_progress = facts.read(store, listed)
            for (op_type, state), count in sorted(counts.items()):
                by_state.add_metric([label, op_type, state], count)
            running.add_metric([label], in_progress)
            lost.add_metric([label], sum(n for (_, state), n in counts.items() if state == State.LOST.value))
            for fact in ended:
                if fact.duration is not None:
                    durations.setdefault((fact.op_type, fact.state), []).append(fact.duration)
        histogram = HistogramMetricFamily("pgba_operation_duration_seconds",
                                          "How long ended operations took, by type and outcome",
                                          labels=["type", "outcome"])
        for (op_type, outcome), values in sorted(durations.items()):
            histogram.add_metric([op_type, outcome], _buckets(values), sum(values))
        return [by_state, running, lost, histogram]


def _buckets(values: List[float]) -> List[Tuple[str, float]]:
    """Cumulative bucket counts in prometheus_client's form, +Inf last."""
    ordered = sorted(values)
    import bisect

    found = [(str(float(bound)), float(bisect.bisect_right(ordered, bound))) for bound in DURATION_BUCKETS]
    return [*found, ("+Inf", float(len(ordered)))]
