"""pg-backup-api benchmark: synthetic operation histories, gunicorn, wrk, one table. See bench/README.md."""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

ROOT = Path(__file__).resolve().parents[1]
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk.lua"
PACKAGED_CONF = ROOT / "packaging" / "gunicorn.conf.py"
VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
# An ssh target that fails at once: nothing listens on port 1, so barman stops at its first ssh call.
FAILING_SSH = "ssh -p 1 postgres@127.0.0.1"
BACKUP_IDS = ("20261120T010000", "20261121T010000", "20261122T010000")


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full benchmark or the quick one CI runs."""

    quick: bool
    list_sizes: tuple
    status_sizes: tuple
    seconds: int  # per wrk run
    runs: int  # medians of this many runs
    burst_seconds: int  # accepted POSTs without a pause
    paced_seconds: int  # accepted POSTs, one every pace_ms
    pace_ms: int
    soak_seconds: int
    rss_requests: int
    recovery_runs: int
    scrape_servers: int  # the /metrics scenario: servers, backups per server, operations in all
    scrape_backups: int
    scrape_operations: int
    cold_starts: int  # first scrapes measured, each after a fresh start of gunicorn

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if quick:
            return cls(True, (0, 10, 100), (1, 100), 1, 1, 1, 1, 250, 2, 1000, 1, 5, 10, 100, 1)
        return cls(False, (0, 1000, 10000), (1, 1000, 10000), 5, 3, 2, 8, 250, 30, 100_000, 5, 5, 100, 10_000, 3)


# -- the synthetic Barman home -------------------------------------------------------------

@dataclass
class Fixture:
    """A real barman.conf, one Barman server per history size, and the operations on disk."""

    root: Path
    sizes: tuple
    conf: Path = field(init=False)
    home: Path = field(init=False)
    ids: Dict[int, List[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.conf = self.root / "barman.conf"
        self.home = self.root / "home"
        conf_dir = self.root / "barman.d"
        self.home.mkdir()
        conf_dir.mkdir()
        self.conf.write_text(textwrap.dedent(f"""\
            [barman]
            barman_home = {self.home}
            barman_user = {getpass.getuser()}
            configuration_files_directory = {conf_dir}
            log_file = {self.root}/barman.log
            """))
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
        """*n* ended recoveries in the on-disk format of the reference (plus our `state` and side files)."""
        jobs, outputs = self.home / server / "jobs", self.home / server / "output"
        jobs.mkdir()
        outputs.mkdir()
        first = datetime(2026, 11, 1, tzinfo=timezone.utc) - timedelta(minutes=30 * n)
        made: List[str] = []
        moment = first
        while len(made) < n:
            moment += timedelta(minutes=30)
            base = moment.strftime("%Y%m%dT%H%M%S")
            # Every 50th second holds two operations: the second one has the `-2` suffix.
            for op_id in ([base, f"{base}-2"] if len(made) % 50 == 49 else [base])[:n - len(made)]:
                self._write_operation(jobs, outputs, op_id, moment, ok=len(made) % 10 != 3)
                made.append(op_id)
        return made

    @staticmethod
    def _write_operation(jobs: Path, outputs: Path, op_id: str, start: datetime, ok: bool) -> None:
        job = {"backup_id": "latest", "destination_directory": f"/srv/restore/{op_id}",
               "remote_ssh_command": "ssh postgres@db2.example.org", "resolved_backup_id": BACKUP_IDS[-1],
               "operation_type": "recovery", "start_time": start.isoformat(timespec="microseconds")}
        lines = [f"Starting remote restore for server pg using backup {BACKUP_IDS[-1]}",
                 f"Destination directory: /srv/restore/{op_id}",
                 "Copying the base backup.", "Copying required WAL segments.",
                 "Generating archive status files", "Identify dangerous settings in destination directory.",
                 "", "Restore operation completed (start time: 2026-11-01 00:00:00, elapsed time: 11 seconds)",
                 "Your PostgreSQL server has been successfully prepared for recovery!"]
        output = {**job, "success": ok,
                  "end_time": (start + timedelta(seconds=12)).isoformat(timespec="microseconds"),
                  "output": "\n".join(lines * 3 if ok else lines[:2] + ["ERROR: rsync error (code 12)"]) + "\n",
                  "exit_code": 0 if ok else 1, "state": "succeeded" if ok else "failed"}
        if not ok:
            output["reason"] = "barman exited with code 1"
        for directory, doc in ((jobs, job), (outputs, output)):
            path = directory / f"{op_id}.json"
            path.write_text(json.dumps(doc, indent=2) + "\n")
            path.chmod(0o640)
        # What this service's worker leaves for each operation, in jobs/.workers/: its log,
        # barman's output so far, and its identity.
        workers = jobs / ".workers"
        workers.mkdir(exist_ok=True)
        (workers / f"{op_id}.log").write_text(f"{start:%Y-%m-%d %H:%M:%S},000 4242 INFO pg_backup_api.runner: "
                                              f"operation {op_id}: running barman restore\n")
        (workers / f"{op_id}.out").write_text(output["output"])
        (workers / f"{op_id}.worker").write_text(json.dumps({"pid": 4242, "start_ticks": 1000, "boot_id": "x"}))

    def sample_ids(self, n: int, count: int = 64) -> List[str]:
        ids = self.ids[n]
        step = max(1, len(ids) // count)
        return ids[::step][:count]

    def pending(self, server: str) -> int:
        """Operations of *server* whose worker has not recorded an end yet."""
        jobs = {p.stem for p in (self.home / server / "jobs").glob("*.json")}
        ended = {p.stem for p in (self.home / server / "output").glob("*.json")}
        return len(jobs - ended)


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
    running: str = "20261130T000000"
    sleeper: Optional[subprocess.Popen] = None

    def __post_init__(self) -> None:
        self.root.mkdir()
        self.conf = self.root / "barman.conf"
        self.home = self.root / "home"
        conf_dir = self.root / "barman.d"
        self.home.mkdir()
        conf_dir.mkdir()
        self.conf.write_text(textwrap.dedent(f"""\
            [barman]
            barman_home = {self.home}
            barman_user = {getpass.getuser()}
            configuration_files_directory = {conf_dir}
            log_file = {self.root}/barman.log
            """))
        per_server = self.operations // self.servers
        for no in range(1, self.servers + 1):
            server = f"m{no}"
            (conf_dir / f"{server}.conf").write_text(
                f"[{server}]\ndescription = \"scrape benchmark\"\nconninfo = host=/nonexistent dbname=postgres\n"
                "streaming_conninfo = host=/nonexistent\nbackup_method = postgres\nstreaming_archiver = on\n"
                "slot_name = barman\n")
            self._history(server)
            jobs, outputs = self.home / server / "jobs", self.home / server / "output"
            jobs.mkdir()
            outputs.mkdir()
            first = datetime(2026, 11, 1, tzinfo=timezone.utc) - timedelta(minutes=30 * per_server)
            for i in range(per_server):
                start = first + timedelta(minutes=30 * i)
                Fixture._write_operation(jobs, outputs, start.strftime("%Y%m%dT%H%M%S"), start, ok=i % 10 != 3)
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
        from pg_backup_api import processes

        jobs = self.home / "m1" / "jobs"
        self.sleeper = subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL, start_new_session=True)
        job = {"backup_id": "latest", "destination_directory": "/srv/restore/following",
               "remote_ssh_command": "ssh postgres@db2.example.org", "resolved_backup_id": "20261129T010000",
               "operation_type": "recovery", "start_time": datetime.now(timezone.utc).isoformat()}
        (jobs / f"{self.running}.json").write_text(json.dumps(job))
        (jobs / ".workers" / f"{self.running}.out").write_text("Starting remote restore for server m1\n")
        (jobs / ".workers" / f"{self.running}.worker").write_text(
            json.dumps(processes.identity(self.sleeper.pid).to_json()))
        return f"/servers/m1/operations/{self.running}/output?follow=1"

    def stop(self) -> None:
        if self.sleeper is not None and self.sleeper.poll() is None:
            self.sleeper.kill()
            self.sleeper.wait()


# -- the service under test ----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Gunicorn:
    """The service under gunicorn on a loopback port, with this checkout's code.

    2 sync workers as the reference was measured, or with *packaged*, the checkout's
    packaging/gunicorn.conf.py as deployed (its log files in the benchmark's folder).
    """

    def __init__(self, fixture: Fixture, packaged: bool = False, workers: int = 2) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = fixture.root / "gunicorn.log"
        # A service configuration of our own, so that one in /etc (tokens, allowlists) stays out of it.
        service_conf = fixture.root / "pg-backup-api.conf"
        service_conf.write_text("[api]\n")
        self.env = {**os.environ, "PG_BACKUP_API_BARMAN_CONF": str(fixture.conf),
                    "PG_BACKUP_API_CONFIG": str(service_conf),
                    "PYTHONPATH": str(ROOT), "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        argv = [str(VENV_BIN / "gunicorn"), "--workers", str(workers), "--worker-class", "sync",
                "--bind", f"{HOST}:{self.port}", "pg_backup_api.app:application"]
        if packaged:
            self.env.update(PG_BACKUP_API_BIND=f"{HOST}:{self.port}", PG_BACKUP_API_WORKERS=str(workers),
                            PG_BACKUP_API_LOG_DIR=str(fixture.root))
            argv = [str(VENV_BIN / "gunicorn"), "-c", str(PACKAGED_CONF), "pg_backup_api.app:application"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=fixture.root, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if http_request(self.url, "GET", "/status")[0] == 200 and len(self.worker_pids()) == workers:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"bench: gunicorn did not start; its log:\n{self.log.read_text()[-4000:]}")

    def worker_pids(self) -> List[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    status = Path(f"/proc/{entry}/status").read_text()
                except OSError:
                    continue
                if re.search(rf"^PPid:\s+{self.proc.pid}$", status, re.M):
                    pids.append(int(entry))
        return sorted(pids)

    def worker_rss_mb(self) -> Dict[int, float]:
        rss = {}
        for pid in self.worker_pids():
            match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
            rss[pid] = int(match.group(1)) / 1024 if match else float("nan")
        return rss

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def http_request(base: str, method: str, path: str, body: Optional[str] = None,
                 timeout: float = 30) -> tuple:
    """(status, parsed JSON body or None, Location header) of one request on a new connection."""
    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        return response.status, doc, response.getheader("Location")
    finally:
        conn.close()


# -- load generation -----------------------------------------------------------------------

@dataclass
class Load:
    """One kind of traffic: GET some paths in turn, or POST a body ("@N@" unique per request)."""

    name: str
    paths: List[str]
    connections: int = 1
    expected: int = 200
    body: Optional[str] = None  # a POST when set; paths[0] is its path
    pace_ms: int = 0  # a pause before each request of a connection


@dataclass
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    socket_errors: int
    timeouts: int
    unexpected: int  # responses whose status is not the expected one
    not_found: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @staticmethod
    def median(results: List["Result"]) -> "Result":
        def med(attr: str) -> float:
            return statistics.median(getattr(r, attr) for r in results)

        return Result(sum(r.requests for r in results), sum(r.seconds for r in results), med("p50_ms"),
                      med("p99_ms"), max(r.max_ms for r in results), sum(r.socket_errors for r in results),
                      sum(r.timeouts for r in results), sum(r.unexpected for r in results),
                      sum(r.not_found for r in results))


class Wrk:
    name = "wrk"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
        self.version = (version.split()[1:2] or ["?"])[0]

    def run(self, url: str, load: Load, seconds: int) -> Result:
        script = self.workdir / f"wrk-{load.pace_ms}.lua"
        if not script.exists():
            text = WRK_SCRIPT.read_text()
            if load.pace_ms:  # wrk pauses before a request only when the script has a delay()
                text += f"\nfunction delay() return {load.pace_ms} end\n"
            script.write_text(text)
        mode = ["post", str(load.expected), load.paths[0], load.body] if load.body else \
            ["get", str(load.expected), *load.paths]
        argv = ["wrk", "-t1", f"-c{load.connections}", f"-d{seconds}s", "--timeout", "10s",
                "-s", str(script), url, "--", *mode]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"bench: wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        doc = json.loads(line.split(" ", 1)[1])
        return Result(doc["requests"], doc["duration_us"] / 1e6, doc["p50_us"] / 1000, doc["p99_us"] / 1000,
                      doc["max_us"] / 1000, doc["socket_errors"], doc["timeouts"], doc["unexpected"],
                      doc["not_found"])


class PythonClient:
    """The fallback when wrk is missing: closed loop, one thread and one connection per request each."""

    name = "python client"
    version = platform.python_version()

    def run(self, url: str, load: Load, seconds: int) -> Result:
        latencies: List[float] = []
        counts = {"socket_errors": 0, "timeouts": 0, "unexpected": 0, "not_found": 0}
        lock = threading.Lock()
        deadline = time.monotonic() + seconds

        def connection(no: int) -> None:
            sent = 0
            while time.monotonic() < deadline:
                if load.pace_ms:
                    time.sleep(load.pace_ms / 1000)
                sent += 1
                if load.body:
                    path, body, method = load.paths[0], load.body.replace("@N@", f"{no}-{sent}"), "POST"
                else:
                    path, body, method = load.paths[(sent - 1) % len(load.paths)], None, "GET"
                start = time.perf_counter()
                try:
                    status = http_request(url, method, path, body, timeout=10)[0]
                except socket.timeout:
                    key = "timeouts"
                except OSError:
                    key = "socket_errors"
                else:
                    key = "unexpected" if status != load.expected else ""
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if key:
                        counts[key] += 1
                    if key == "unexpected" and status == 404:
                        counts["not_found"] += 1

        started = time.monotonic()
        threads = [threading.Thread(target=connection, args=(i + 1,)) for i in range(load.connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return latency_result(latencies, time.monotonic() - started, **counts)


def latency_result(latencies: List[float], seconds: float, **counts: int) -> Result:
    ordered = sorted(latencies) or [0.0]

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000

    return Result(len(latencies), seconds, pct(50), pct(99), ordered[-1] * 1000, **counts)


def open_streams(base: str, path: str, count: int, attempts: int = 200) -> "tuple[List[socket.socket], int]":
    """*count* open event streams of *path* (their headers read, the sockets kept) and how many 429s it took.

    gunicorn's workers take connections as they come, so one worker may refuse (429) while the other
    has room: a refused stream is asked for again.
    """
    host, port = base.split("//")[1].split(":")
    streams: List[socket.socket] = []
    refused = 0
    for _ in range(attempts):
        if len(streams) == count:
            return streams, refused
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        status = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"?"
        if status == b"200":
            streams.append(sock)
        else:
            sock.close()
            if status != b"429":
                raise SystemExit(f"bench: following {path} answered {head[:200]!r}")
            refused += 1
            time.sleep(0.05)
    for sock in streams:
        sock.close()
    raise SystemExit(f"bench: could not open {count} streams of {path} in {attempts} attempts")


def stream_alive(sock: socket.socket) -> bool:
    """The server has not closed this stream (what it sent meanwhile is read and dropped)."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(65536):
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False


# -- the report ----------------------------------------------------------------------------

@dataclass
class Target:
    text: str
    check: Callable[["Row"], bool]


@dataclass
class Row:
    scenario: str
    ops: str
    connections: str
    result: Optional[Result] = None
    reference: str = ""
    target: Optional[Target] = None
    note: str = ""
    values: Dict[str, Any] = field(default_factory=dict)

    def verdict(self, quick: bool) -> str:
        if self.target is None:
            return ""
        if quick:
            return "(quick)"
        return "met" if self.target.check(self) else "MISSED"


def fmt(value: float, digits: int = 2) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def print_table(rows: List[Row], quick: bool) -> None:
    header = ["scenario", "ops on disk", "conns", "p50 ms", "p99 ms", "req/s", "errors/non-2xx",
              "reference", "target", "verdict"]
    table = [header]
    for row in rows:
        r = row.result
        cells = [row.scenario, row.ops, row.connections]
        if r is not None:
            bad = r.socket_errors + r.timeouts + r.unexpected
            cells += [fmt(r.p50_ms), fmt(r.p99_ms), fmt(r.rps, 0), f"{bad} of {r.requests:,}"]
        else:
            cells += [row.values.get("p50", ""), row.values.get("p99", ""), "", row.values.get("errors", "")]
        cells += ["" if quick else row.reference, row.target.text if row.target else "", row.verdict(quick)]
        table.append(cells)
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    for n, line in enumerate(table):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        if row.note:
            print(f"  {row.scenario}: {row.note}")


def cpu_busy(seconds: float = 1.0) -> float:
    """Percent of all CPUs busy over *seconds*: what else runs on the machine skews every figure."""
    def sample() -> tuple:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 100.0 * (1 - (idle1 - idle0) / max(1, total1 - total0))


def machine_line(client: Any) -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "missing"

    return (f"machine: nproc {os.cpu_count()}, CPU {cpu}, {mem_kb / 1024 / 1024:.1f} GiB, "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, barman {version('barman')}, gunicorn {version('gunicorn')}, "
            f"Flask {version('flask')}, {client.name} {client.version}")


# -- the scenarios -------------------------------------------------------------------------

class Bench:
    def __init__(self, plan: Plan, client: Any, fixture: Fixture, service: Gunicorn) -> None:
        self.plan = plan
        self.client = client
        self.fixture = fixture
        self.service = service
        self.rows: List[Row] = []
        self.post_server = Fixture.server(max(plan.list_sizes + plan.status_sizes))
        self.runs = 0

    def say(self, text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    def measure(self, load: Load, seconds: Optional[int] = None, runs: Optional[int] = None,
                after_run: Optional[Callable[[], Any]] = None) -> Result:
        results = []
        for _ in range(runs or self.plan.runs):
            self.runs += 1
            # Every run POSTs to destinations of its own: "@RUN@" in the body names the run.
            current = replace(load, body=load.body.replace("@RUN@", str(self.runs))) if load.body else load
            results.append(self.client.run(self.service.url, current, seconds or self.plan.seconds))
            if after_run is not None:
                after_run()
        result = Result.median(results)
        self.say(f"{load.name}: p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
                 f"{result.rps:.0f} req/s, {result.unexpected + result.socket_errors + result.timeouts} bad")
        return result

    def status_endpoint(self) -> None:
        self.rows.append(Row("GET /status", "-", "1", self.measure(Load("status c1", ["/status"])),
                             "", Target("p50 <= 0.5 ms", lambda r: r.result.p50_ms <= 0.5)))
        self.rows.append(Row("GET /status", "-", "4", self.measure(Load("status c4", ["/status"], 4)),
                             "0.42 ms, 3,540 req/s", Target("p50 <= 0.5 ms", lambda r: r.result.p50_ms <= 0.5)))

    def operation_status(self) -> None:
        biggest = max(self.plan.status_sizes)
        for n in self.plan.status_sizes:
            paths = [f"/servers/{Fixture.server(n)}/operations/{i}" for i in self.fixture.sample_ids(n)]
            self.rows.append(Row("GET one operation's status", f"{n:,}", "1",
                                 self.measure(Load(f"status of one op, {n} ops", paths)),
                                 "6.6 ms" if n == biggest and not self.plan.quick else "",
                                 Target("p50 <= 1.5 ms", lambda r: r.result.p50_ms <= 1.5)))
        status = {n: r.result.p50_ms for n, r in self._rows_by_size("GET one operation's status")}
        small, big = min(status), max(status)
        ratio = status[big] / status[small] if status[small] else float("inf")
        self.rows.append(Row("status cost vs ops (p50 ratio)", f"{small:,} -> {big:,}", "1", None, "",
                             Target("ratio <= 1.5", lambda r: ratio <= 1.5), values={"p50": f"x{ratio:.2f}"}))

    def operations_list(self) -> None:
        biggest = max(self.plan.list_sizes)
        for n in self.plan.list_sizes:
            reference = {1000: "25 ms", 10000: "257 ms"}.get(n, "") if not self.plan.quick else ""
            target = Target("p50 <= 10 ms", lambda r: r.result.p50_ms <= 10) if n == biggest else None
            self.rows.append(Row("GET the operations list", f"{n:,}", "1",
                                 self.measure(Load(f"list, {n} ops", [f"/servers/{Fixture.server(n)}/operations"])),
                                 reference, target))
        # jobs/ changing all the time: a listing cached on the folder's mtime is seldom valid.
        server = Fixture.server(biggest)
        with self.writer("list") as writer:
            busy = self.measure(Load(f"list, {biggest} ops, POSTs arriving", [f"/servers/{server}/operations"]))
        self.wait_for_workers()
        self.rows.append(Row("the list while a POST arrives every 0.5 s", f"{biggest:,}", "1", busy,
                             note=f"{writer['posts']} recoveries POSTed to the listed server meanwhile, "
                                  f"{writer['bad']} failures"))
        lists = dict((n, r.result.p50_ms) for n, r in self._rows_by_size("GET the operations list"))
        lo, hi = min(lists), max(lists)
        per_op_us = (lists[hi] - lists[lo]) / (hi - lo) * 1000 if hi > lo else 0.0
        self.rows.append(Row("list cost per operation", f"{lo:,} -> {hi:,}", "1", None, "",
                             Target("<= 1 us per op", lambda r: per_op_us <= 1.0),
                             values={"p50": f"{per_op_us:.2f} us/op"}))

    def metrics(self) -> None:
        """GET /metrics on 5 servers' catalogues and 10,000 operations: a worker's first scrape, then
        scrapes in a row; and /status while 20 clients follow a running operation's output."""
        plan = self.plan
        fixture = ScrapeFixture(self.fixture.root / "scrape", plan.scrape_servers, plan.scrape_backups,
                                plan.scrape_operations)
        what = f"{plan.scrape_servers} x {plan.scrape_backups} backups, {plan.scrape_operations:,} ops"
        try:
            firsts = []
            for _ in range(plan.cold_starts):
                service = Gunicorn(fixture, workers=1)
                try:
                    started = time.perf_counter()
                    status = http_request(service.url, "GET", "/metrics", timeout=300)[0]
                    firsts.append((time.perf_counter() - started) * 1000)
                    if status != 200:
                        raise SystemExit(f"bench: GET /metrics answered {status}")
                finally:
                    service.stop()
            first = statistics.median(firsts)
            self.say(f"first scrape: {', '.join(f'{t:.0f}' for t in firsts)} ms")
            self.rows.append(Row("first GET /metrics of a new worker", what, "1", None, "",
                                 Target("<= 1 s", lambda r: first <= 1000),
                                 values={"p50": f"{first:,.0f}"},
                                 note=f"first scrape after each of {len(firsts)} starts of gunicorn (ms): "
                                      + ", ".join(f"{t:,.0f}" for t in firsts)))
            service = Gunicorn(fixture)
            try:
                for _ in range(4):  # every worker past its first scrape
                    http_request(service.url, "GET", "/metrics", timeout=300)
                self.rows.append(Row("GET /metrics", what, "1", self.measure(Load("metrics", ["/metrics"])), "",
                                     Target("p50 <= 50 ms", lambda r: r.result.p50_ms <= 50)))
            finally:
                service.stop()
            path = fixture.start_running_operation()
            service = Gunicorn(fixture, packaged=True)
            try:
                streams, refused = open_streams(service.url, path, 20)
                try:
                    result = self.measure(Load("status, 20 streams open", ["/status"]))
                    still_open = sum(stream_alive(s) for s in streams)
                finally:
                    for sock in streams:
                        sock.close()
                    # The operation ends (its worker gone): the streams end at once instead of at gunicorn's
                    # graceful timeout, which would wait for them.
                    fixture.stop()
                self.rows.append(Row("GET /status, 20 output streams open", "-", "1", result, "",
                                     Target("p99 <= 50 ms", lambda r: r.result.p99_ms <= 50 and still_open == 20),
                                     note=f"gunicorn as packaging/gunicorn.conf.py says (2 workers x 16 threads, "
                                          f"at most 12 streams each): 20 streams of a running recovery opened "
                                          f"({refused} 429s retried), {still_open} still open after the run"))
            finally:
                service.stop()
        finally:
            fixture.stop()

    def _rows_by_size(self, scenario: str) -> List[tuple]:
        return [(int(r.ops.replace(",", "")), r) for r in self.rows if r.scenario == scenario]

    def posts(self) -> None:
        path = f"/servers/{self.post_server}/operations"
        rejected = json.dumps({"type": "recovery", "backup_id": "latest", "remote_ssh_command": FAILING_SSH})
        self.rows.append(Row("rejected POST (400, field missing)", "-", "1",
                             self.measure(Load("rejected POST", [path], expected=400, body=rejected)),
                             "2.2 ms", Target("p50 <= 2 ms", lambda r: r.result.p50_ms <= 2)))
        for name, seconds, pace in (("paced", self.plan.paced_seconds, self.plan.pace_ms),
                                    ("burst", self.plan.burst_seconds, 0)):
            body = json.dumps({"type": "recovery", "backup_id": "latest", "remote_ssh_command": FAILING_SSH,
                               "destination_directory": f"/srv/pgba-bench/{name}/@RUN@/@N@"})
            waits: List[float] = []
            result = self.measure(Load(f"accepted POST ({name})", [path], expected=202, body=body,
                                       pace_ms=pace), seconds=seconds,
                                  after_run=lambda w=waits: w.append(self.wait_for_workers()))
            what = "back to back" if not pace else f"one every {pace} ms"
            # Back to back, the workers spawned (0.25 s of CPU each) saturate the machine: that row
            # shows what a burst costs, the paced one what a POST costs, and only it has the target.
            target = Target("p50 <= 15 ms", lambda r: r.result.p50_ms <= 15) if pace else None
            self.rows.append(Row(f"accepted POST (202), {what}", "-", "1", result, "30-45 ms", target,
                                 note=f"{result.requests} workers spawned in {len(waits)} runs of {seconds} s; "
                                      f"all had ended at most {max(waits):.1f} s after a run's last POST"))

    def wait_for_workers(self, timeout: float = 300) -> float:
        """Wait until every spawned worker has recorded its end (they fail fast: ssh to port 1)."""
        start = time.monotonic()
        while self.fixture.pending(self.post_server):
            if time.monotonic() - start > timeout:
                raise SystemExit(f"bench: {self.fixture.pending(self.post_server)} workers still running "
                                 f"after {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - start

    def recovery_overhead(self) -> None:
        """POST -> FAILED through the API against `barman restore` run directly with the same arguments."""
        restore = "restore" if tuple(int(p) for p in metadata.version("barman").split(".")[:2]) >= (3, 12) \
            else "recover"
        server, backup = self.post_server, BACKUP_IDS[-1]
        api_times, direct_times = [], []
        warmup = 0 if self.plan.quick else 1
        for i in range(warmup + self.plan.recovery_runs):
            destination = f"/srv/pgba-bench/overhead/{i}"
            body = json.dumps({"type": "recovery", "backup_id": backup, "remote_ssh_command": FAILING_SSH,
                               "destination_directory": destination})
            start = time.perf_counter()
            status, doc, _ = http_request(self.service.url, "POST", f"/servers/{server}/operations", body)
            if status != 202:
                raise SystemExit(f"bench: recovery POST answered {status}: {doc}")
            state = self._poll_until_ended(server, doc["operation_id"])
            api = time.perf_counter() - start
            if state["status"] != "FAILED" or "connect" not in (state.get("output") or ""):
                raise SystemExit(f"bench: the recovery did not fail at its ssh step: {state}")
            argv = [str(VENV_BIN / "barman"), "-c", str(self.fixture.conf), restore,
                    f"--remote-ssh-command={FAILING_SSH}", "--", server, backup, destination + "-direct"]
            start = time.perf_counter()
            proc = subprocess.run(argv, cwd=self.fixture.root, env=self.service.env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True)
            direct = time.perf_counter() - start
            if proc.returncode == 0 or "connect" not in proc.stdout + proc.stderr:
                raise SystemExit(f"bench: barman restore run directly did not fail at ssh: {proc.stdout}"
                                 f"{proc.stderr}")
            if i >= warmup:
                api_times.append(api)
                direct_times.append(direct)
        api, direct = statistics.median(api_times), statistics.median(direct_times)
        overhead = api - direct
        self.rows.append(Row("recovery overhead: API POST -> FAILED minus barman restore", "-", "1", None,
                             "~0.4 s", Target("<= 0.15 s", lambda r: overhead <= 0.15),
                             note=f"median of {len(api_times)}: through the API {api:.3f} s, barman restore "
                                  f"directly {direct:.3f} s, difference {overhead:.3f} s (polled every 5 ms)",
                             values={"p50": f"+{overhead:.3f} s"}))

    def _poll_until_ended(self, server: str, op_id: str, timeout: float = 120) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, doc, _ = http_request(self.service.url, "GET", f"/servers/{server}/operations/{op_id}")
            if status != 200:
                raise SystemExit(f"bench: status of {op_id} answered {status}: {doc}")
            if doc["status"] != "IN_PROGRESS":
                return doc
            time.sleep(0.005)
        raise SystemExit(f"bench: operation {op_id} still IN_PROGRESS after {timeout} s")

    @contextmanager
    def writer(self, tag: str, period: float = 0.5) -> Iterator[Dict[str, int]]:
        """A thread that POSTs a recovery every *period* s and at once GETs it back, twice."""
        stop = threading.Event()
        counts = {"posts": 0, "bad": 0, "not_found": 0}
        path = f"/servers/{self.post_server}/operations"

        def write_and_read_back() -> None:
            while not stop.is_set():
                counts["posts"] += 1
                body = json.dumps({"type": "recovery", "backup_id": "latest", "remote_ssh_command": FAILING_SSH,
                                   "destination_directory": f"/srv/pgba-bench/{tag}/{counts['posts']}"})
                status, doc, location = http_request(self.service.url, "POST", path, body)
                if status != 202:
                    counts["bad"] += 1
                else:
                    for check in (location, f"{path}/{doc['operation_id']}"):
                        got = http_request(self.service.url, "GET", check)[0]
                        counts["not_found"] += got == 404
                        counts["bad"] += got != 200
                stop.wait(period)

        thread = threading.Thread(target=write_and_read_back)
        thread.start()
        try:
            yield counts
        finally:
            stop.set()
            thread.join()

    def soak(self) -> None:
        """8 connections reading statuses and lists while a writer POSTs and reads back at once."""
        big, mid = max(self.plan.status_sizes), sorted(self.plan.list_sizes)[-2]
        paths = []
        for op_id in self.fixture.sample_ids(big):
            paths += [f"/servers/{Fixture.server(big)}/operations/{op_id}",
                      f"/servers/{Fixture.server(mid)}/operations"]
        with self.writer("soak") as writer:
            result = self.measure(Load("soak", paths, 8), seconds=self.plan.soak_seconds, runs=1)
        self.wait_for_workers()
        clean = lambda r: (r.result.unexpected + r.result.socket_errors + r.result.timeouts  # noqa: E731
                           + writer["bad"] == 0)
        self.rows.append(Row(f"soak {self.plan.soak_seconds} s: status ({big:,}) + list ({mid:,})",
                             f"{big:,} / {mid:,}", "8", result, "", Target("0 errors, 0 404", clean),
                             note=f"{result.not_found} spurious 404s from the readers; a writer POSTed "
                                  f"{writer['posts']} recoveries meanwhile and read each back at once: "
                                  f"{writer['not_found']} 404s, {writer['bad']} other failures"))

    def memory(self) -> None:
        """RSS of each gunicorn worker before, half-way through and after plan.rss_requests requests."""
        big, mid = max(self.plan.status_sizes), sorted(self.plan.list_sizes)[-2]
        paths = ["/status", f"/servers/{Fixture.server(mid)}/operations"]
        paths += [f"/servers/{Fixture.server(big)}/operations/{i}" for i in self.fixture.sample_ids(big)]
        samples = [self.service.worker_rss_mb()]
        done, chunk = 0, self.plan.seconds * (1 if self.plan.quick else 2)
        for goal in (self.plan.rss_requests // 2, self.plan.rss_requests):
            while done < goal:
                done += self.client.run(self.service.url, Load("rss", paths, 4), chunk).requests
            samples.append(self.service.worker_rss_mb())
        pids = sorted(samples[0])
        trail = "; ".join(f"pid {p}: " + " -> ".join(f"{s.get(p, float('nan')):.1f}" for s in samples)
                          for p in pids)
        worst = max(samples[-1].values())
        growth = max(samples[-1].get(p, 0) - samples[1].get(p, 0) for p in pids)
        self.rows.append(Row(f"RSS per gunicorn worker after {done:,} requests", "-", "4", None, "",
                             Target("< 80 MB, no growth", lambda r: worst < 80 and growth <= 1.0),
                             values={"p50": f"{worst:.1f} MB", "errors": f"+{growth:.1f} MB 2nd half"},
                             note=f"VmRSS MB at start -> half-way -> end: {trail}"))


SCENARIOS = {"status": "status_endpoint", "operation": "operation_status", "list": "operations_list",
             "post": "posts", "recovery": "recovery_overhead", "soak": "soak", "rss": "memory", "metrics": "metrics"}


def scenario_names(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose among {', '.join(SCENARIOS)}")
    return names


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds, tiny histories, no thresholds (CI)")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator (default: wrk when installed, else a Python client)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    parser.add_argument("--only", type=scenario_names, default=list(SCENARIOS), metavar="NAME,...",
                        help=f"run only these scenarios, among: {', '.join(SCENARIOS)}")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--packaged", action="store_true",
                        help="run gunicorn with packaging/gunicorn.conf.py (as deployed) instead of 2 sync workers")
    parser.add_argument("--serve", action="store_true",
                        help="only build the histories and start gunicorn, then wait (for profiling)")
    parser.add_argument("--restore", action="store_true",
                        help="instead: a real recovery by hand, through the service and with ssh_multiplex off, "
                             "on loopback and over 20 ms (root; builds tests/sandbox); with --quick one run each, "
                             "loopback only")
    parser.add_argument("--runs", type=int, default=3, help="--restore: alternating runs of each way (default 3)")
    args = parser.parse_args(argv)
    if args.restore:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import restore

        return restore.main(1 if args.quick else max(1, args.runs), with_latency=not args.quick,
                            strict=args.strict and not args.quick)
    # A SIGTERM (a CI timeout, Ctrl-C of --serve) still stops gunicorn and removes the folder.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    plan = Plan.make(args.quick)
    if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk")):
        if not shutil.which("wrk"):
            parser.error("wrk is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="pgba-bench-"))
    client = Wrk(workdir) if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk")) \
        else PythonClient()
    service = None
    try:
        busy_before = cpu_busy()
        if busy_before > 10:
            print(f"bench: the CPUs are {busy_before:.0f}% busy before starting: other work on this machine "
                  "will show in the figures", file=sys.stderr)
        started = time.monotonic()
        sizes = tuple(sorted(set(plan.list_sizes + plan.status_sizes)))
        fixture = Fixture(workdir, sizes)
        print(f"bench: {sum(sizes):,} synthetic operations written in {time.monotonic() - started:.1f} s "
              f"under {workdir}", file=sys.stderr)
        if args.packaged and not PACKAGED_CONF.is_file():
            parser.error(f"--packaged: {PACKAGED_CONF} is missing")
        service = Gunicorn(fixture, packaged=args.packaged)
        if args.serve:
            print(f"{service.url}  servers: {', '.join(Fixture.server(n) for n in sizes)}  "
                  f"worker pids: {service.worker_pids()}  (Ctrl-C stops)", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 0
        bench = Bench(plan, client, fixture, service)
        print(machine_line(client))
        for name in args.only:
            getattr(bench, SCENARIOS[name])()
        what = "quick run: tiny histories, 1 run of 1 s each, no thresholds" if plan.quick else \
            f"medians of {plan.runs} runs of {plan.seconds} s"
        service.stop()
        busy_after = cpu_busy()
        how = "gunicorn as packaging/gunicorn.conf.py says" if args.packaged else "gunicorn 2 sync workers"
        print(f"pg-backup-api benchmark ({what}; {how}; {client.name}; "
              f"{time.monotonic() - started:.0f} s in all; other CPU use: {busy_before:.0f}% before, "
              f"{busy_after:.0f}% after)")
        print_table(bench.rows, plan.quick)
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"machine": machine_line(client), "quick": plan.quick,
                 "rows": [{"scenario": r.scenario, "ops": r.ops, "connections": r.connections,
                           "result": r.result.__dict__ if r.result else None, "values": r.values,
                           "reference": r.reference, "target": r.target.text if r.target else None,
                           "verdict": r.verdict(plan.quick), "note": r.note} for r in bench.rows]}, indent=2))
        if plan.quick:
            # No thresholds here, but a scenario that measured nothing or the wrong answers is broken.
            broken = [r.scenario for r in bench.rows if r.result and (
                r.result.requests == 0 or r.result.unexpected + r.result.socket_errors + r.result.timeouts)]
            if broken:
                print(f"bench: no request or unexpected answers in: {', '.join(broken)}", file=sys.stderr)
                return 1
            return 0
        return 1 if args.strict and any(r.verdict(False) == "MISSED" for r in bench.rows) else 0
    finally:
        if service is not None:
            service.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
