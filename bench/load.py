"""The load: gunicorn running the service, and the clients that measure it (wrk, or a Python fallback)."""

from __future__ import annotations

import http.client
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk.lua"
PACKAGED_CONF = ROOT / "packaging" / "gunicorn.conf.py"
VENV_BIN = Path(sys.executable).parent
STAND_IN_SSH_DIR = Path(__file__).resolve().parent / "bin"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Gunicorn:
    """The service under gunicorn on a loopback port, with this checkout's code.

    2 sync workers as the reference was measured, or with *packaged*, the checkout's
    packaging/gunicorn.conf.py as deployed (its log files in the benchmark's folder).
    """

    def __init__(self, fixture: Any, packaged: bool = False, workers: int = 2, code: Path = ROOT) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = fixture.root / "gunicorn.log"
        # A service configuration of our own, so that one in /etc (tokens, allowlists) stays out of it.
        # Without ssh multiplexing: these scenarios measure the service's own path against a target that
        # refuses ssh, where an ssh master would retry for seconds; `--restore` measures multiplexing.
        service_conf = fixture.root / "pg-backup-api.conf"
        service_conf.write_text("[api]\nssh_multiplex = off\n")
        # bench/bin/ssh first: it answers the service's look at the target's paths from this machine.
        self.env = {**os.environ, "PG_BACKUP_API_BARMAN_CONF": str(fixture.conf),
                    "PG_BACKUP_API_CONFIG": str(service_conf), "PYTHONPATH": str(code),
                    "PATH": f"{STAND_IN_SSH_DIR}:{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
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
    status, raw, location = http_raw(base, method, path, body, timeout)
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        doc = None
    return status, doc, location


def http_raw(base: str, method: str, path: str, body: Optional[str] = None, timeout: float = 30) -> tuple:
    """(status, body bytes, Location header) of one request on a new connection."""
    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("Location")
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

