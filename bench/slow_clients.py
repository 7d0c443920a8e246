"""Slow clients: `GET /status` while 500 idle, half-sent requests hold connections open. See bench/README.md.

Three ways the service is reached, each measured the same way:

* gunicorn with packaging/gunicorn.conf.py, as deployed;
* the development server, `pg-backup-api serve`;
* the shipped HTTPS vhost (apache/pg-backup-api.conf, with apache/pg-backup-api-mpm.conf) in front of
  that gunicorn: there the slow
  clients cannot send a request at all without a client certificate, so each sends half of a TLS
  handshake; and, as a client that has one would, half of a request inside a finished handshake.

For each, SLOW connections are opened and each sends the start of a request (or of a handshake) and
then nothing; a keeper opens a new one for each the server closes, so SLOW stay open all along. Then
REQUESTS `GET /status`, each on a connection of its own, one after the other, with a 5 s timeout: the
row has their p50 and p99 (a timeout counts as 5 s), the failures, and how long the server kept a
slow connection before closing it (median). Nothing outside one temporary folder is touched.
"""

from __future__ import annotations

import os
import resource
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import Fixture  # noqa: E402
from load import HOST, ROOT, VENV_BIN, Gunicorn, free_port  # noqa: E402

CLIENT_TIMEOUT = 5.0
# A request whose head never ends, and the first bytes of a TLS ClientHello announcing 512 bytes.
HALF_REQUEST = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
HALF_HANDSHAKE = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
TARGET_P99_MS = 50.0
GIVE_UP = 10  # failed requests after which a way's row stops, the rest counted as failed


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


@dataclass
class Endpoint:
    """Where to connect, and how: plain TCP, or TLS with a client certificate."""

    port: int
    tls: Optional[ssl.SSLContext] = None

    def connect(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=timeout)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname=HOST)
        return sock


@dataclass
class Keeper:
    """Keeps *count* connections open, each after *opening* sent its first bytes; reopens those closed."""

    endpoint: Endpoint
    count: int
    opening: Callable[[Endpoint], socket.socket]
    lifetimes: List[float] = field(default_factory=list)  # seconds the server kept each one it closed
    refused: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Keeper":
        for _ in range(self.count):
            self._open()
        self._thread.start()
        return self

    @property
    def open(self) -> int:
        return len(self._selector.get_map())

    def _open(self) -> None:
        try:
            sock = self.opening(self.endpoint)
        except OSError:
            self.refused += 1
            return
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ, time.monotonic())

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.2):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, ssl.SSLWantReadError):
                    continue
                except OSError:
                    data = b""
                if data:
                    continue  # an answer (an error page): the server closes next
                self._selector.unregister(sock)
                sock.close()
                self.lifetimes.append(time.monotonic() - key.data)
            while self.open < self.count and not self._stop.is_set():
                self._open()
                if self.refused and self.open < self.count:
                    time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()


def half_request(endpoint: Endpoint) -> socket.socket:
    sock = endpoint.connect(CLIENT_TIMEOUT)
    sock.sendall(HALF_REQUEST)
    return sock


def half_handshake(endpoint: Endpoint) -> socket.socket:
    sock = socket.create_connection((HOST, endpoint.port), timeout=CLIENT_TIMEOUT)
    sock.sendall(HALF_HANDSHAKE)
    return sock


def status_once(endpoint: Endpoint) -> Optional[float]:
    """Seconds for one `GET /status` on a new connection, or None if it failed or took over the timeout."""
    started = time.monotonic()
    try:
        with endpoint.connect(CLIENT_TIMEOUT) as sock:
            sock.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b'"OK"\n'):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        return None
    return time.monotonic() - started if answer.startswith(b"HTTP/1.1 200") else None


@dataclass
class Row:
    way: str
    slow: int
    requests: int
    p50_ms: float
    p99_ms: float
    failed: int
    closed: int
    kept_s: Optional[float]

    def line(self) -> str:
        kept = f"{self.kept_s:.1f} s" if self.kept_s is not None else "never"
        verdict = "met" if self.p99_ms <= TARGET_P99_MS and not self.failed else "MISSED"
        return (f"| {self.way} | {self.slow} | {self.requests} | {self.p50_ms:.2f} | {self.p99_ms:.2f} | "
                f"{self.failed} | {self.closed} | {kept} | {verdict} |")


def measure(way: str, endpoint: Endpoint, opening: Callable[[Endpoint], socket.socket], slow: int,
            requests: int, hold: float) -> Row:
    keeper = Keeper(endpoint, slow, opening).start()
    try:
        time.sleep(1.0)  # every slow connection is in the server's hands
        times: List[Optional[float]] = []
        while len(times) < requests:
            times.append(status_once(endpoint))
            if sum(t is None for t in times) >= GIVE_UP:  # the way does not hold: the rest would fail too
                times += [None] * (requests - len(times))
        # Then long enough for the server's timeout to close the slow ones (and the keeper to reopen them).
        time.sleep(max(0.0, hold))
    finally:
        keeper.stop()
    took = sorted(t if t is not None else CLIENT_TIMEOUT for t in times)
    p99 = took[min(len(took) - 1, int(round(0.99 * (len(took) - 1))))]
    kept = statistics.median(keeper.lifetimes) if keeper.lifetimes else None
    row = Row(way, slow, requests, statistics.median(took) * 1000, p99 * 1000, sum(t is None for t in times),
              len(keeper.lifetimes), kept)
    say(f"{way}: p50 {row.p50_ms:.2f} ms, p99 {row.p99_ms:.2f} ms, {row.failed} failed, "
        f"{row.closed} slow connections closed by the server (median after {kept} s)")
    return row


@contextmanager
def dev_server(fixture: Fixture) -> Iterator[int]:
    port = free_port()
    service_conf = fixture.root / "pg-backup-api.conf"
    service_conf.write_text("[api]\n")
    env = {**os.environ, "PG_BACKUP_API_BARMAN_CONF": str(fixture.conf), "PG_BACKUP_API_CONFIG": str(service_conf),
           "PYTHONPATH": str(ROOT)}
    with open(fixture.root / "serve.log", "ab") as log:
        proc = subprocess.Popen([str(VENV_BIN / "python"), "-m", "pg_backup_api", "serve", "--port", str(port)],
                                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while status_once(Endpoint(port)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (fixture.root / "serve.log").read_text()
                raise SystemExit(f"bench: pg-backup-api serve did not start:\n{log}")
            time.sleep(0.1)
        yield port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def apache_in_front(work: Path, backend: int) -> Iterator[tuple]:
    """The shipped HTTPS vhost in front of *backend*: (its port, a TLS context with a client certificate)."""
    sys.path.insert(0, str(ROOT))
    from tests.e2e.conftest import Apache, make_certificates

    work.mkdir()
    work.chmod(0o755)
    work.parent.chmod(0o755)  # www-data reads the error bodies from here
    tls = make_certificates(work / "tls")
    server = Apache(work)
    mpm = ROOT / "apache" / "pg-backup-api-mpm.conf"
    shutil.copy(mpm, server.confdir / "conf-available" / mpm.name)
    server.run("a2enconf", mpm.stem)
    port = free_port()
    server.https_site("pg-backup-api", port, backend, tls)
    context = ssl.create_default_context(cafile=tls["verify"])
    context.load_cert_chain(*tls["patroni"])
    server.start([port])
    time.sleep(2)  # its workers started
    say(f"Apache with apache/pg-backup-api-mpm.conf: {apache_rss_mb(server.confdir):.0f} MB resident")
    try:
        yield port, context
    finally:
        server.stop()


def apache_rss_mb(confdir: Path) -> float:
    """The resident memory of the Apache instance run from *confdir*, every process of it."""
    total = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(confdir).encode() in (entry / "cmdline").read_bytes():
                status = (entry / "status").read_text()
                total += int(status.split("VmRSS:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1024


def main(slow: int = 500, requests: int = 300, quick: bool = False) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the slow connections are this process's too
    hold = 2.0 if quick else 25.0
    work = Path(tempfile.mkdtemp(prefix="pgba-slow-"))
    rows: List[Row] = []
    try:
        fixture = Fixture(work, (0,))
        service = Gunicorn(fixture, packaged=True)
        try:
            endpoint = Endpoint(service.port)
            rows.append(measure("gunicorn, packaging/gunicorn.conf.py", endpoint, half_request, slow, requests, hold))
            if os.geteuid() == 0:
                with apache_in_front(work / "apache", service.port) as (port, context):
                    rows.append(measure("Apache vhost -> gunicorn, half a TLS handshake", Endpoint(port, context),
                                        half_handshake, slow, requests, hold))
                    rows.append(measure("Apache vhost -> gunicorn, half a request (client certificate)",
                                        Endpoint(port, context), half_request, slow, requests, hold))
            else:
                say("not root: the Apache rows are left out")
        finally:
            service.stop()
        with dev_server(fixture) as port:
            rows.append(measure("pg-backup-api serve", Endpoint(port), half_request, slow, requests, hold))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"slow clients: {slow} idle half-sent connections held open; {requests} GET /status one after the "
          f"other, each on a new connection, {CLIENT_TIMEOUT:.0f} s timeout; target p99 <= {TARGET_P99_MS:.0f} ms")
    print("| way | slow | requests | p50 ms | p99 ms | failed | slow closed by the server | kept (median) | target |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row.line())
    return 0 if quick or all(r.p99_ms <= TARGET_P99_MS and not r.failed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
