"""bench/compare REV: the whole request-path benchmark on revision REV and on this checkout, side by side.

Each round runs `bench/run --json` once on each code, alternating (before, after, before, after, ...),
so load from elsewhere on the machine falls on both. A row's figure is the median over the rounds; its
noise is the spread of the rounds around that median (the larger of the two codes' spreads), so a
change shows as worse only when the ratio is beyond what the rounds themselves disagree by.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent

# (figure, unit, higher is better): what a row is judged on.
FIGURES = (("p50_ms", "ms", False), ("p99_ms", "ms", False), ("rps", "req/s", True))


def export(rev: str, folder: Path) -> Path:
    """The tree of git revision *rev* (package, bench and tests, which the benchmark imports) in *folder*."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def run_once(tree: Path, args: Sequence[str], out: Path) -> Dict[str, Dict[str, float]]:
    """One `bench/run --json` of the code in *tree*: each row's figures by scenario."""
    subprocess.run(["bash", str(tree / "bench" / "run"), "--json", str(out), *args], check=True,
                   stdout=sys.stderr)
    rows: Dict[str, Dict[str, float]] = {}
    for row in json.loads(out.read_text())["rows"]:
        result = row["result"]
        if not result:
            continue
        seconds = result["seconds"]
        rows[row["scenario"]] = {"p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
                                 "rps": result["requests"] / seconds if seconds else 0.0}
    return rows


def spread(values: List[float]) -> float:
    """How far the rounds stray from their median, as a fraction of it."""
    middle = statistics.median(values)
    return max(abs(v - middle) for v in values) / middle if middle else 0.0


def compare(before: List[Dict[str, Dict[str, float]]], after: List[Dict[str, Dict[str, float]]]
            ) -> List[Tuple[str, str, float, float, float, float, str]]:
    """Rows of (scenario, figure, before, after, ratio after/before, noise, verdict)."""
    table = []
    for scenario in after[0]:
        if not all(scenario in run for run in before + after):
            continue
        for name, _unit, higher_better in FIGURES:
            old = [run[scenario][name] for run in before]
            new = [run[scenario][name] for run in after]
            old_mid, new_mid = statistics.median(old), statistics.median(new)
            if old_mid <= 0 or new_mid <= 0:
                continue
            ratio = new_mid / old_mid
            noise = max(spread(old), spread(new))
            worse = (ratio < 1 - noise) if higher_better else (ratio > 1 + noise)
            table.append((scenario, name, old_mid, new_mid, ratio, noise, "WORSE" if worse else "same"))
    return table


def print_table(rev: str, rounds: int, table: List[Tuple[str, str, float, float, float, float, str]]) -> None:
    print(f"bench/compare {rev} vs this checkout: medians of {rounds} alternating rounds; noise = the widest "
          "spread of one code's rounds around its median")
    header = ("scenario", "figure", f"before {rev}", "after", "after/before", "noise", "verdict")
    lines = [header] + [(s, f, f"{b:.2f}", f"{a:.2f}", f"{r:.2f}", f"±{n:.0%}", v) for s, f, b, a, r, n, v in table]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/compare", description=__doc__)
    parser.add_argument("rev", help="the git revision to compare this checkout with")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each code (default 2)")
    args, bench_args = parser.parse_known_args(argv)  # the rest goes to bench/run, e.g. --quick
    work = Path(tempfile.mkdtemp(prefix="pgba-compare-"))
    try:
        old_tree = export(args.rev, work / "before")
        before, after = [], []
        for n in range(args.rounds):
            before.append(run_once(old_tree, bench_args, work / f"before-{n}.json"))
            after.append(run_once(ROOT, bench_args, work / f"after-{n}.json"))
        table = compare(before, after)
        print_table(args.rev, args.rounds, table)
        return 1 if any(row[-1] == "WORSE" for row in table) else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
