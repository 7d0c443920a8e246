"""N recoveries started at once, to distinct directories on one target host (loopback), three ways:
`barman restore` by hand, through the service (ssh multiplexed, queued by max_recoveries_per_host),
through the service with `ssh_multiplex = off`. How many end DONE / FAILED, the wall time until the
last ended, the ssh connections sshd accepted and dropped, and, through the service, the latency of
GET /status read every 20 ms while the burst runs. See bench/README.md.
"""

from __future__ import annotations

import math
import re
import shutil
import statistics
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from restore import (
    BY_HAND,
    MUX,
    PLAIN,
    VARIANTS,
    Link,
    RestoreBench,
    Service,
    by_hand_argv,
    count_connections,
    http,
    loopback,
    say,
)

STATUS_EVERY = 0.020
TARGET_P99_MS = 50.0
DROPPED = re.compile(r"drop connection #\d+ from \S+ port \d+ on \S+ port (\d+) past MaxStartups|"
                     r"drop connection #\d+ from \[\S+\]:\d+ on \[\S+\]:(\d+) past MaxStartups")


def count_dropped(log: Path, port: int, offset: int) -> int:
    """Connections sshd closed at once because MaxStartups was reached (LogLevel VERBOSE logs each)."""
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    return sum(1 for m in DROPPED.finditer(text) if int(m.group(1) or m.group(2)) == port)


def percentile(values: List[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]  # nearest rank


class StatusPoller:
    """GET /status every 20 ms (a new connection each, as a monitoring client would) until stopped."""

    def __init__(self, port: int) -> None:
        self.port, self.latencies, self.errors = port, [], 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stopped.is_set():
            start = time.perf_counter()
            try:
                ok = http(self.port, "GET", "/status")[0] == 200
            except OSError:
                ok = False
            if ok:
                self.latencies.append((time.perf_counter() - start) * 1000)
            else:
                self.errors += 1
            self.stopped.wait(STATUS_EVERY)

    def stop(self) -> List[float]:
        self.stopped.set()
        self.thread.join()
        return self.latencies


@dataclass
class Burst:
    done: int = 0
    failed: int = 0
    started_within: float = 0.0
    wall: float = 0.0
    connections: int = 0
    dropped: int = 0
    status_ms: List[float] = field(default_factory=list)
    status_errors: int = 0
    reasons: Counter = field(default_factory=Counter)


def last_line(text: str) -> str:
    """Barman's last ERROR line (its very last line is often only 'See log file for more details')."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["(no output)"])[-1][:160]


class BurstBench(RestoreBench):
    def __init__(self, size: int, strict: bool) -> None:
        super().__init__(1, False, strict)
        self.size = size

    def service_settings(self) -> str:
        # The whole burst is accepted and queued: max_queued_per_host (default 16) would refuse some with a 429.
        return f"[api]\nmax_queued_per_host = {self.size}\nmax_queued = {max(64, self.size)}\n"

    def title(self) -> str:
        return (f"recovery burst: {self.size} started at once to distinct directories, one target host, loopback: "
                f"{BY_HAND} / {MUX} / {PLAIN}")

    def measure_links(self, box: Dict[str, str], sandbox: Path, services: Dict[str, Service]) -> None:
        cells = ["recoveries at once", "way", "started within s", "DONE", "FAILED", "wall s (last ended)",
                 "ssh connections", "dropped by sshd", "/status p50 ms", "/status p99 ms", "target", "verdict"]
        self.rows.append("| " + " | ".join(cells) + " |")
        self.rows.append("|" + "|".join("---" for _ in cells) + "|")
        link = loopback(box)
        for variant in VARIANTS:
            destinations = [f"{box['RESTORE_PARENT']}/bench-burst-{VARIANTS.index(variant)}-{i}"
                            for i in range(self.size)]
            offset = link.sshd_log.stat().st_size
            try:
                if variant == BY_HAND:
                    burst = self.by_hand_burst(box, link, destinations)
                else:
                    burst = self.service_burst(box, link, services[variant], destinations)
            finally:
                for destination in destinations:
                    shutil.rmtree(destination, ignore_errors=True)
            time.sleep(0.3)  # sshd writes its log line as the connection is accepted; let it land
            burst.connections = count_connections(link.sshd_log, link.sshd_port, offset)
            burst.dropped = count_dropped(link.sshd_log, link.sshd_port, offset)
            say(f"burst of {self.size}: {variant}: {burst.done} DONE, {burst.failed} FAILED in {burst.wall:.1f} s, "
                f"{burst.connections} ssh connections, {burst.dropped} dropped")
            self.row(variant, burst)

    def row(self, variant: str, burst: Burst) -> None:
        p50 = p99 = target = verdict = ""
        if burst.status_ms:
            p50, p99 = f"{statistics.median(burst.status_ms):.1f}", f"{percentile(burst.status_ms, 99):.1f}"
        if variant == MUX:
            target = f"all DONE, /status p99 <= {TARGET_P99_MS:g} ms"
            met = burst.failed == 0 and bool(burst.status_ms) and percentile(burst.status_ms, 99) <= TARGET_P99_MS
            verdict = "met" if met else "MISSED"
            self.targets_met &= met
        self.rows.append(f"| {self.size} | {variant} | {burst.started_within:.2f} | {burst.done} | {burst.failed} | "
                         f"{burst.wall:.1f} | {burst.connections} | {burst.dropped} | {p50} | {p99} | {target} | "
                         f"{verdict} |")
        polled = f"; /status read {len(burst.status_ms)} times, {burst.status_errors} errors" if burst.status_ms else ""
        reasons = "; ".join(f"{n} x {reason}" for reason, n in burst.reasons.most_common(4))
        self.notes.append(f"{variant}: {burst.failed} FAILED{': ' + reasons if reasons else ''}{polled}")

    def by_hand_burst(self, box: Dict[str, str], link: Link, destinations: List[str]) -> Burst:
        burst = Burst()
        start = time.perf_counter()
        procs = [subprocess.Popen(by_hand_argv(box, link.ssh_command, d), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for d in destinations]
        burst.started_within = time.perf_counter() - start
        for proc in procs:
            output, _ = proc.communicate(timeout=900)
            if proc.returncode == 0:
                burst.done += 1
            else:
                burst.failed += 1
                burst.reasons[last_line(output)] += 1
        burst.wall = time.perf_counter() - start
        return burst

    def service_burst(self, box: Dict[str, str], link: Link, service: Service, destinations: List[str]) -> Burst:
        server, backup = box["BARMAN_SERVER"], box["BACKUP_ID"]
        burst = Burst()
        poller = StatusPoller(service.port)
        time.sleep(0.5)  # a few idle reads first, so the poller runs before the burst lands
        start = time.perf_counter()
        with ThreadPoolExecutor(len(destinations)) as pool:
            ids = list(pool.map(lambda d: service.post_recovery(server, backup, link.ssh_command, d), destinations))
        burst.started_within = time.perf_counter() - start
        try:
            # In arrival order, each polled every 0.25 s: once the last ends, the rest are read at once.
            states = [service.wait(server, op_id, poll=0.25) for op_id in ids]
            burst.wall = time.perf_counter() - start
        finally:
            burst.status_ms = poller.stop()
            burst.status_errors = poller.errors
        for state in states:
            if state["status"] == "DONE":
                burst.done += 1
            else:
                burst.failed += 1
                burst.reasons[state.get("reason") or last_line(state.get("output") or "")] += 1
        return burst


def main(size: int, strict: bool = False) -> int:
    return BurstBench(size, strict).main()
