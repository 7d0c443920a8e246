"""The data: a Barman home with synthetic operation histories, written through the store's own code."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
BACKUP_IDS = ("20261120T010000", "20261121T010000", "20261122T010000")


def store_module() -> Any:
    """This checkout's pg_backup_api.store.jobs: the layout is the store's, never a copy of it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from pg_backup_api.store import jobs as store

    return store


@contextmanager
def no_fsync() -> Iterator[None]:
    """Synthetic histories need no durability: skipping fsync makes writing 100,000 operations 10x faster."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def recovery_job(start: datetime, destination: str) -> Dict[str, Any]:
    return {"backup_id": "latest", "destination_directory": destination,
            "remote_ssh_command": "ssh postgres@db2.example.org", "resolved_backup_id": BACKUP_IDS[-1],
            "operation_type": "recovery", "start_time": start.isoformat(timespec="microseconds")}


def ended_operation(store: Any, start: datetime, ok: bool) -> str:
    """One recovery created at *start* and ended 12 s later, with what the worker leaves beside it."""
    destination = f"/srv/restore/{start:%Y%m%dT%H%M%S}"
    op_id = store.create(recovery_job(start, destination), start)
    lines = [f"Starting remote restore for server pg using backup {BACKUP_IDS[-1]}",
             f"Destination directory: {destination}",
             "Copying the base backup.", "Copying required WAL segments.",
             "Generating archive status files", "Identify dangerous settings in destination directory.",
             "", "Restore operation completed (start time: 2026-11-01 00:00:00, elapsed time: 11 seconds)",
             "Your PostgreSQL server has been successfully prepared for recovery!"]
    text = "\n".join(lines * 3 if ok else lines[:2] + ["ERROR: rsync error (code 12)"]) + "\n"
    store.log_path(op_id).write_text(f"{start:%Y-%m-%d %H:%M:%S},000 4242 INFO pg_backup_api.worker.runner: "
                                     f"operation {op_id}: running barman restore\n")
    store.progress_path(op_id).write_text(text)
    store.record_worker(op_id, {"pid": 4242, "start_ticks": 1000, "boot_id": "x"})
    output = {**recovery_job(start, destination), "success": ok,
              "end_time": (start + timedelta(seconds=12)).isoformat(timespec="microseconds"),
              "output": text, "exit_code": 0 if ok else 1, "state": "succeeded" if ok else "failed"}
    if not ok:
        output["reason"] = "barman exited with code 1"
    store.finish(op_id, output)
    return op_id


@contextmanager
def repeating(period: float, step: Callable[[], None], last: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """*step* in a thread of its own every *period* s while the block runs, then *last* once in that thread."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            step()
            stop.wait(period)
        if last is not None:
            last()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def arriving(store: Any, period: float) -> Iterator[Dict[str, int]]:
    """A thread that creates an operation every *period* s, through the store, and ends the one before:
    the store's folders then always changed within the last second."""
    counts = {"created": 0}
    previous: List[str] = []

    def create_and_end_the_one_before() -> None:
        now = datetime.now(timezone.utc)
        op_id = store.create(recovery_job(now, "/srv/pgba-bench/arriving"), now)
        counts["created"] += 1
        if previous:
            store.finish(previous.pop(), {"success": True, "state": "succeeded",
                                          "end_time": now.isoformat(timespec="microseconds")})
        previous.append(op_id)

    def end_the_last() -> None:
        if previous:
            store.finish(previous.pop(), {"success": True, "state": "succeeded"})

    with repeating(period, create_and_end_the_one_before, end_the_last):
        yield counts


def write_barman_conf(root: Path) -> Tuple[Path, Path, Path]:
    """barman.conf under *root*, with an empty barman.d/ and Barman's home: (conf, home, conf_dir)."""
    conf, home, conf_dir = root / "barman.conf", root / "home", root / "barman.d"
    home.mkdir()
    conf_dir.mkdir()
    conf.write_text(textwrap.dedent(f"""\
        [barman]
        barman_home = {home}
        barman_user = {getpass.getuser()}
        configuration_files_directory = {conf_dir}
        log_file = {root}/barman.log
        """))
    return conf, home, conf_dir


@dataclass
class Fixture:
    """A real barman.conf, one Barman server per history size, and the operations on disk."""

    root: Path
    sizes: tuple
    conf: Path = field(init=False)
    home: Path = field(init=False)
    ids: Dict[int, List[str]] = field(default_factory=dict)
    _stores: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.conf, self.home, conf_dir = write_barman_conf(self.root)
        for n in self.sizes:
            server = self.server(n)
            (conf_dir / f"{server}.conf").write_text(textwrap.dedent(f"""\
                [{server}]
                description = "benchmark server with {n} operations"
                conninfo = host=/nonexistent dbname=postgres
                streaming_conninfo = host=/nonexistent
                backup_method = postgres
                streaming_archiver = on
                slot_name = barman
                """))
            self._backups(server)
            self.ids[n] = self._operations(server, n)

    @staticmethod
    def server(n: int) -> str:
        return f"n{n}"

    def _backups(self, server: str) -> None:
        meta = self.home / server / "meta"
        meta.mkdir(parents=True)
        for backup_id in BACKUP_IDS:
            begin = datetime.strptime(backup_id, "%Y%m%dT%H%M%S")
            (meta / f"{backup_id}-backup.info").write_text(
                f"backup_id={backup_id}\nstatus=DONE\n"
                f"begin_time={begin:%Y-%m-%d %H:%M:%S}.000000+00:00\n"
                f"end_time={begin:%Y-%m-%d %H:%M}:02.000000+00:00\n")

    def _operations(self, server: str, n: int) -> List[str]:
        """*n* ended recoveries, written by the store's own code (plus our `state` and the workers' files)."""
        store = self.store(server)
        first = datetime(2026, 11, 1, tzinfo=timezone.utc) - timedelta(minutes=30 * n)
        made: List[str] = []
        moment = first
        with no_fsync():
            while len(made) < n:
                moment += timedelta(minutes=30)
                # Every 50th second holds two operations: the store gives the second one the `-2` suffix.
                for _ in range(min(2 if len(made) % 50 == 49 else 1, n - len(made))):
                    made.append(ended_operation(store, moment, ok=len(made) % 10 != 3))
        return made

    def store(self, server: str) -> Any:
        """The store of *server*, one per server: its index then follows the folders incrementally."""
        if server not in self._stores:
            self._stores[server] = store_module().OperationStore(self.home / server, server)
        return self._stores[server]

    def sample_ids(self, n: int, count: int = 64) -> List[str]:
        ids = self.ids[n]
        step = max(1, len(ids) // count)
        return ids[::step][:count]

    def pending(self, server: str) -> int:
        """Operations of *server* whose worker has not recorded an end yet."""
        return len(self.store(server).unfinished())


@dataclass
class ScrapeFixture:
    """What /metrics reads on a real Barman host: servers with a backup history and archived WAL, ended
    operations, and one recovery still running (its worker a `sleep` this benchmark started), to follow."""

    root: Path
    servers: int
    backups: int
    operations: int
    conf: Path = field(init=False)
    home: Path = field(init=False)
    running: str = ""
    sleeper: Optional[subprocess.Popen] = None

    def __post_init__(self) -> None:
        self.root.mkdir()
        self.conf, self.home, conf_dir = write_barman_conf(self.root)
        per_server = self.operations // self.servers
        for no in range(1, self.servers + 1):
            server = f"m{no}"
            (conf_dir / f"{server}.conf").write_text(
                f"[{server}]\ndescription = \"scrape benchmark\"\nconninfo = host=/nonexistent dbname=postgres\n"
                "streaming_conninfo = host=/nonexistent\nbackup_method = postgres\nstreaming_archiver = on\n"
                "slot_name = barman\n")
            self._history(server)
            store = store_module().OperationStore(self.home / server, server)
            first = datetime(2026, 11, 1, tzinfo=timezone.utc) - timedelta(minutes=30 * per_server)
            with no_fsync():
                for i in range(per_server):
                    ended_operation(store, first + timedelta(minutes=30 * i), ok=i % 10 != 3)
        # Fresh `barman check` results, so that no scrape starts the background refresh (it would run
        # `barman check` against servers that do not exist and take the CPU the scrapes are measured on).
        checks = self.home / "jobs" / ".metrics"
        checks.mkdir(parents=True)
        (checks / "checks.json").write_text(json.dumps({"time": time.time(), "duration_s": 1.0, "servers": {
            f"m{no}": {"postgresql": 1, "wal_level": 1, "backup_maximum_age": 1}
            for no in range(1, self.servers + 1)}}))

    def _history(self, server: str) -> None:
        """One DONE backup a day, ten WAL segments archived after each."""
        meta, wals = self.home / server / "meta", self.home / server / "wals"
        meta.mkdir(parents=True)
        wals.mkdir()
        first = datetime(2026, 11, 30, 1, tzinfo=timezone.utc) - timedelta(days=self.backups)
        xlog = []

        def segment(n: int) -> str:
            return f"00000001{n // 256:08X}{n % 256:08X}"

        for i in range(self.backups):
            begin = first + timedelta(days=i)
            backup_id = begin.strftime("%Y%m%dT%H%M%S")
            (meta / f"{backup_id}-backup.info").write_text(
                f"backup_id={backup_id}\nstatus=DONE\nmode=postgres\nserver_name={server}\n"
                f"begin_time={begin:%Y-%m-%d %H:%M:%S}.000000+00:00\n"
                f"end_time={begin + timedelta(minutes=20):%Y-%m-%d %H:%M:%S}.000000+00:00\n"
                f"begin_wal={segment(10 * i)}\nend_wal={segment(10 * i)}\ntimeline=1\nversion=150018\n"
                f"size={30_000_000 + i}\nxlog_segment_size=16777216\n"
                "copy_stats={'copy_time': 12.5, 'total_time': 13.0}\n")
            for w in range(10):
                archived = begin + timedelta(minutes=5 + 140 * w)
                xlog.append(f"{segment(10 * i + w)} 16777216 {archived.timestamp()} None")
        (wals / f"{server}-xlog.db").write_text("\n".join(xlog) + "\n")

    def start_running_operation(self) -> str:
        """A recovery of m1 that runs for as long as the benchmark: its worker is a sleep. Its path."""
        sys.path.insert(0, str(ROOT))
        from pg_backup_api.worker import processes

        store = store_module().OperationStore(self.home / "m1", "m1")
        self.sleeper = subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL, start_new_session=True)
        job = {"backup_id": "latest", "destination_directory": "/srv/restore/following",
               "remote_ssh_command": "ssh postgres@db2.example.org", "resolved_backup_id": "20261129T010000",
               "operation_type": "recovery", "start_time": datetime.now(timezone.utc).isoformat()}
        self.running = store.create(job, datetime.now(timezone.utc))
        store.progress_path(self.running).write_text("Starting remote restore for server m1\n")
        store.record_worker(self.running, processes.identity(self.sleeper.pid).to_json())
        return f"/servers/m1/operations/{self.running}/output?follow=1"

    def stop(self) -> None:
        if self.sleeper is not None and self.sleeper.poll() is None:
            self.sleeper.kill()
            self.sleeper.wait()

