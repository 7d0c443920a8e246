"""N recoveries waiting for a slot on one host: the CPU and memory their workers use while they wait.

One recovery holds the host's only slot (`max_recoveries_per_host = 1`; a stand-in barman that
waits for a file the benchmark never writes), N more are accepted and wait for it, queued. Once all
of them say so, the CPU time of the N waiting workers (utime + stime from /proc/PID/stat) is read
at the start and the end of a window, and their VmRSS at the end. Everything is in one temporary
folder, removed at the end; the workers are canceled through the service first. See bench/README.md.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List

from data import ROOT, Fixture

# Never opens: the recovery holding the slot holds it until it is canceled.
HOLDING_BARMAN = textwrap.dedent("""\
    #!/bin/sh
    echo "Copying the base backup."
    while [ ! -e "$0.never" ]; do sleep 1; done
    """)


def cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(waiting: int, seconds: float = 20.0) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="pgba-bench-waiting-"))
    saved = dict(os.environ)
    client, ids = None, []
    try:
        fixture = Fixture(workdir, (0,))
        server = Fixture.server(0)
        barman = workdir / "barman-holding"
        barman.write_text(HOLDING_BARMAN)
        barman.chmod(0o755)
        service_conf = workdir / "pg-backup-api.conf"
        service_conf.write_text(f"[api]\nmax_recoveries_per_host = 1\nmax_queued_per_host = {waiting}\n"
                                f"max_queued = {waiting}\nssh_multiplex = off\n")
        # What the detached workers read: this checkout's package, the stand-in barman, these settings.
        os.environ.update(PYTHONPATH=str(ROOT), PG_BACKUP_API_BARMAN=str(barman),
                          PG_BACKUP_API_CONFIG=str(service_conf), PG_BACKUP_API_BARMAN_CONF=str(fixture.conf))
        from pg_backup_api import create_app
        from pg_backup_api.rules.settings import Settings

        client = create_app(Settings.from_env()).test_client()
        for i in range(waiting + 1):
            body = {"type": "recovery", "backup_id": "latest", "destination_directory": f"/srv/bench/w{i}",
                    "remote_ssh_command": "ssh -p 1 postgres@127.0.0.1"}
            response = client.post(f"/servers/{server}/operations", json=body)
            if response.status_code != 202:
                raise RuntimeError(f"POST {i}: {response.status_code} {response.json}")
            ids.append(response.json["operation_id"])
        deadline = time.monotonic() + 120
        while _states(client, server, ids).count("queued") < waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not {waiting} queued after 120 s: {_states(client, server, ids)}")
            time.sleep(0.5)
        pids = [_worker_pid(fixture.home / server, op_id) for op_id in ids[1:]]
        time.sleep(2)  # past the first asks of the last ones to arrive
        before = sum(cpu_seconds(pid) for pid in pids)
        time.sleep(seconds)
        used = sum(cpu_seconds(pid) for pid in pids) - before
        rss = [rss_mb(pid) for pid in pids]
        print(f"{waiting} recoveries waiting for a slot, {seconds:.0f} s: {used:.2f} CPU-seconds in all, "
              f"{100 * used / seconds:.1f}% of one core; RSS {sum(rss):.0f} MB in all, {sum(rss) / len(rss):.1f} MB "
              f"each (this checkout: {ROOT})")
        return 0
    finally:
        for op_id in ids if client is not None else ():
            client.post(f"/servers/{Fixture.server(0)}/operations/{op_id}/cancel")
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(workdir, ignore_errors=True)


def _states(client: Any, server: str, ids: List[str]) -> List[str]:
    return [client.get(f"/servers/{server}/operations/{op_id}").json["state"] for op_id in ids]


def _worker_pid(home: Path, op_id: str) -> int:
    worker: Dict[str, Any] = json.loads((home / "jobs" / ".workers" / f"{op_id}.worker").read_text())
    return int(worker["pid"])
