"""The report: rows, targets, the table, and what the machine was doing."""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

if TYPE_CHECKING:
    from load import Result


@dataclass
class Target:
    text: str
    check: Callable[["Row"], bool]


@dataclass
class Row:
    scenario: str
    ops: str
    connections: str
    result: Optional["Result"] = None
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

