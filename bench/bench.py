"""pg-backup-api benchmark: synthetic operation histories, gunicorn, wrk, one table. See bench/README.md.

data.py builds the Barman home through the store's own code, load.py runs gunicorn and the load
generator, report.py prints the table; this file holds the scenarios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import BACKUP_IDS, Fixture, ScrapeFixture, arriving, repeating  # noqa: E402
from load import (  # noqa: E402
    PACKAGED_CONF,
    ROOT,
    VENV_BIN,
    Gunicorn,
    Load,
    PythonClient,
    Result,
    Wrk,
    http_request,
    open_streams,
    stream_alive,
)
from report import Row, Target, cpu_busy, machine_line, print_table  # noqa: E402

# An ssh target that fails at once: nothing listens on port 1, so barman stops at its first ssh call.
FAILING_SSH = "ssh -p 1 postgres@127.0.0.1"


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
    index_sizes: tuple  # the index scenario: a mid-sized and a big history

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if quick:
            return cls(True, (0, 10, 100), (1, 100), 1, 1, 1, 1, 250, 2, 1000, 1, 5, 10, 100, 1, (10, 100))
        return cls(False, (0, 1000, 10000), (1, 1000, 10000), 5, 3, 2, 8, 250, 30, 100_000, 5, 5, 100, 10_000, 3,
                   (10_000, 100_000))


# -- the scenarios -------------------------------------------------------------------------

class Bench:
    def __init__(self, plan: Plan, client: Any, fixture: Fixture, service: Gunicorn,
                 codes: Optional[List[Tuple[str, Path]]] = None) -> None:
        self.plan = plan
        self.codes = codes or [("after", ROOT)]  # the versions the index scenario runs, each on the same data
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

    def index(self) -> None:
        """The operation index: each version (--compare) on the same data, one after the other: the list
        unchanged and right after a new operation appears, one status, the workers' memory."""
        saved = self.service
        try:
            for label, code in self.codes:
                self.service = Gunicorn(self.fixture, code=code)
                try:
                    self._index_rows(label)
                finally:
                    self.service.stop()
        finally:
            self.service = saved

    def _index_rows(self, label: str) -> None:
        mid, big = self.plan.index_sizes
        judged = label == "after"

        def target(text: str, check: Callable[[Row], bool]) -> Optional[Target]:
            return Target(text, check) if judged else None

        url = self.service.url
        started = time.monotonic()
        for n in (mid, big):  # each worker reads the histories once, at start-up, before it answers
            for _ in range(4):
                http_request(url, "GET", f"/servers/{Fixture.server(n)}/operations", timeout=900)
        self.say(f"{label}: the first lists took {time.monotonic() - started:.1f} s")
        self.rows.append(Row(f"[{label}] GET /status", "-", "4", self.measure(Load(f"{label}: status c4",
                                                                                     ["/status"], 4)),
                             "", target("p50 <= 0.5 ms", lambda r: r.result.p50_ms <= 0.5)))
        for n in (mid, big):
            server = Fixture.server(n)
            path = f"/servers/{server}/operations"
            self._settle(server)
            limit = 1.0 if n == mid else None
            self.rows.append(Row(f"[{label}] list, nothing changed for a second", f"{n:,}", "1",
                                 self.measure(Load(f"{label}: list, {n} ops, unchanged", [path])), "",
                                 target("p50 <= 1 ms", lambda r: r.result.p50_ms <= 1.0) if limit else None))
            # An operation every 50 ms: each request comes within the index's settle time of a change (it
            # lists jobs/ again) and most find a new name (they read it and extend the listing).
            with arriving(self.fixture.store(server), 0.05) as counts:
                busy = self.measure(Load(f"{label}: list, {n} ops, right after a change", [path]))
            limit = 5.0 if n == mid else 40.0
            self.rows.append(Row(f"[{label}] list right after a new operation", f"{n:,}", "1", busy, "",
                                 target(f"p50 <= {limit:g} ms", lambda r, x=limit: r.result.p50_ms <= x),
                                 note=f"an operation created every 50 ms through the store, the one before it "
                                      f"ended: {counts['created']} in all, {busy.requests} lists"))
        server = Fixture.server(big)
        paths = [f"/servers/{server}/operations/{i}" for i in self.fixture.sample_ids(big)]
        self.rows.append(Row(f"[{label}] GET one operation's status", f"{big:,}", "1",
                             self.measure(Load(f"{label}: status of one op, {big} ops", paths)), "",
                             target("p50 <= 1 ms", lambda r: r.result.p50_ms <= 1.0)))
        self.client.run(url, Load("rss", [f"/servers/{server}/operations", *paths], 4), self.plan.seconds * 2)
        worst = max(self.service.worker_rss_mb().values())
        self.rows.append(Row(f"[{label}] RSS per gunicorn worker", f"{big:,}", "4", None, "",
                             target("<= 120 MB", lambda r: worst <= 120), values={"p50": f"{worst:.1f} MB"},
                             note="VmRSS after listing and reading statuses of the big history"))

    def _settle(self, server: str, settle: float = 1.2) -> None:
        """Wait until the server's folders have not changed for *settle* s."""
        home = self.fixture.home / server
        while True:
            age = time.time() - max(p.stat().st_mtime for p in (home / "jobs", home / "output"))
            if age > settle:
                return
            time.sleep(settle - age)

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
        counts = {"posts": 0, "bad": 0, "not_found": 0}
        path = f"/servers/{self.post_server}/operations"

        def write_and_read_back() -> None:
            counts["posts"] += 1
            body = json.dumps({"type": "recovery", "backup_id": "latest", "remote_ssh_command": FAILING_SSH,
                               "destination_directory": f"/srv/pgba-bench/{tag}/{counts['posts']}"})
            status, doc, location = http_request(self.service.url, "POST", path, body)
            if status != 202:
                counts["bad"] += 1
                return
            for check in (location, f"{path}/{doc['operation_id']}"):
                got = http_request(self.service.url, "GET", check)[0]
                counts["not_found"] += got == 404
                counts["bad"] += got != 200

        with repeating(period, write_and_read_back):
            yield counts

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
             "post": "posts", "recovery": "recovery_overhead", "soak": "soak", "rss": "memory", "metrics": "metrics",
             "index": "index"}


def scenario_names(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose among {', '.join(SCENARIOS)}")
    return names


def checkout(rev: str, folder: Path) -> Path:
    """The package of git revision *rev*, extracted into *folder* (for the index scenario's "before")."""
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "pg_backup_api"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


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
    parser.add_argument("--compare", metavar="REV",
                        help="the index scenario also runs the package of git revision REV (extracted to the "
                             "temporary folder), on the same data, before this checkout's")
    parser.add_argument("--slow-clients", action="store_true",
                        help="instead: GET /status while 500 idle half-sent requests are held open, against gunicorn "
                             "as packaged, through the Apache vhost (root) and against pg-backup-api serve "
                             "(bench/slow_clients.py; with --quick fewer requests, no thresholds)")
    parser.add_argument("--runs", type=int, default=3, help="--restore: alternating runs of each way (default 3)")
    parser.add_argument("--burst", type=int, metavar="N",
                        help="with --restore, instead: N recoveries started at once to distinct directories, by hand, "
                             "through the service and with ssh_multiplex off, loopback only (e.g. 30)")
    parser.add_argument("--waiting", type=int, metavar="N",
                        help="instead: the CPU and memory of N recoveries waiting for a slot on one host (e.g. 60)")
    args = parser.parse_args(argv)
    if args.waiting is not None:
        if args.waiting < 1:
            parser.error("--waiting N needs N >= 1")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import waiting

        return waiting.main(args.waiting, seconds=5 if args.quick else 20)
    if args.burst is not None and (not args.restore or args.quick or args.burst < 1):
        parser.error("--burst N (N >= 1) goes with --restore, not with --quick")
    if args.slow_clients:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import slow_clients

        return slow_clients.main(requests=50 if args.quick else 300, quick=args.quick)
    if args.restore:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        if args.burst:
            import burst

            return burst.main(args.burst, strict=args.strict)
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
        sizes = tuple(sorted(set(plan.list_sizes + plan.status_sizes
                                 + (plan.index_sizes if "index" in args.only else ()))))
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
        codes = [("after", ROOT)]
        if args.compare:
            codes.insert(0, (f"before {args.compare}", checkout(args.compare, workdir / "before")))
        bench = Bench(plan, client, fixture, service, codes)
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
