"""A recovery on the real stack, three ways side by side: `barman restore` by hand, through the service
(ssh multiplexed), through the service with `ssh_multiplex = off`; on loopback and over a 20 ms
round trip. Wall times and the ssh connections sshd accepted for each. See bench/README.md.

Run as root: it builds the project's sandbox (tests/sandbox: PostgreSQL, Barman, sshd on loopback)
in a temporary folder and removes it at the end. The 20 ms link is a network namespace whose
loopback has `tc netem delay 10ms` (each packet crosses loopback once each way), with a second sshd
inside it and a relay on 127.0.0.1 into it; where the kernel has no netem, the relay itself holds
every chunk 10 ms each way, and the report says so.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests import sandbox as stack  # noqa: E402

VENV = Path(sys.executable).parent.parent
ONE_WAY_DELAY = 0.010  # 20 ms round trip
CLONE_NEWNET = 0x40000000
BY_HAND, MUX, PLAIN = "barman restore by hand", "through the service", "through the service, ssh_multiplex = off"
VARIANTS = (BY_HAND, MUX, PLAIN)
TARGET_RATIO = 0.35


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port: int, method: str, path: str, body: Optional[dict] = None) -> tuple:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"} if body is not None else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


# -- the 20 ms link ------------------------------------------------------------------------------

class Relay:
    """127.0.0.1:port -> an sshd, holding each chunk *delay* s in each direction (0: pass at once).

    *connect* opens the upstream socket: plain loopback, or inside the benchmark's namespace.
    Each direction has a reader and a writer thread, so the delay adds latency, not a bandwidth cap.
    """

    def __init__(self, connect: Callable[[], socket.socket], delay: float) -> None:
        self.connect, self.delay = connect, delay
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = self.connect()
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(client, upstream)
            self._pipe(upstream, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        chunks: "queue.Queue[tuple]" = queue.Queue()

        def read() -> None:
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                chunks.put((time.monotonic() + self.delay, data))
                if not data:
                    return

        def write() -> None:
            while True:
                due, data = chunks.get()
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def namespace_connector(namespace: str, port: int) -> Callable[[], socket.socket]:
    """Sockets made by one thread that entered *namespace*: they connect to its 127.0.0.1:*port*."""
    requests: "queue.Queue[queue.Queue]" = queue.Queue()
    entered: "queue.Queue[Optional[str]]" = queue.Queue()

    def thread() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        if libc.setns(fd, CLONE_NEWNET) != 0:  # only this thread moves: the process stays where it is
            entered.put(os.strerror(ctypes.get_errno()))
            return
        entered.put(None)
        while True:
            reply = requests.get()
            try:
                reply.put(socket.create_connection(("127.0.0.1", port), timeout=10))
            except OSError as exc:
                reply.put(exc)

    threading.Thread(target=thread, daemon=True).start()
    error = entered.get(timeout=10)
    if error:
        raise OSError(f"setns into {namespace}: {error}")

    def connect() -> socket.socket:
        reply: "queue.Queue" = queue.Queue()
        requests.put(reply)
        result = reply.get(timeout=15)
        if isinstance(result, Exception):
            raise result
        return result

    return connect


def run(argv: List[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=check, timeout=900)


@dataclass
class Link:
    """How ssh reaches the target: the command the client gives, and the sshd log to count in."""

    name: str
    ssh_command: str
    sshd_log: Path
    sshd_port: int
    note: str = ""


@contextmanager
def delayed_link(box: Dict[str, str], sandbox: Path) -> Iterator[Link]:
    """A 20 ms round trip to the same target: netem in a namespace of ours, else a delaying relay."""
    namespace = f"pgba-bench-{os.getpid()}"
    sshd_dir = sandbox / "sshd"
    log = Path(box["LOG_DIR"]) / "sshd-delayed.log"
    pid_file = sshd_dir / "sshd-delayed.pid"
    known_hosts = Path(box["BARMAN_UNIX_HOME"]) / ".ssh" / "known_hosts"
    saved_known_hosts = known_hosts.read_text()
    relay = None
    made_namespace = False
    try:
        run(["ip", "netns", "add", namespace])
        made_namespace = True
        run(["ip", "-n", namespace, "link", "set", "lo", "up"])
        netem = run(["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                     "delay", f"{ONE_WAY_DELAY * 1000:.0f}ms"], check=False)
        port = int(box["SSH_PORT"])
        if netem.returncode == 0:
            # The same sshd configuration, inside the namespace (its own loopback, so the same port).
            base = (sshd_dir / "sshd_config").read_text()
            config = sshd_dir / "sshd_config-delayed"
            config.write_text(re.sub(r"(?m)^PidFile .*$", f"PidFile {pid_file}", base))
            run(["ip", "netns", "exec", namespace, "/usr/sbin/sshd", "-f", str(config), "-E", str(log)])
            deadline = time.monotonic() + 10
            while not pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            relay = Relay(namespace_connector(namespace, port), 0.0)
            note = f"tc netem delay {ONE_WAY_DELAY * 1000:.0f}ms on the loopback of namespace {namespace}"
        else:
            reason = " ".join((netem.stderr or netem.stdout).split()) or f"exit code {netem.returncode}"
            say(f"netem is unavailable on this kernel ({reason}): the relay delays the packets itself")
            log = Path(box["LOG_DIR"]) / "sshd.log"
            relay = Relay(lambda: socket.create_connection(("127.0.0.1", port), timeout=10), ONE_WAY_DELAY)
            note = (f"NETEM UNAVAILABLE on this kernel (tc: {reason}); instead a userspace relay on 127.0.0.1 "
                    f"holds every chunk {ONE_WAY_DELAY * 1000:.0f} ms each way (latency only, no bandwidth cap)")
        key = " ".join((sshd_dir / "ssh_host_ed25519_key.pub").read_text().split()[:2])
        known_hosts.write_text(saved_known_hosts + f"[127.0.0.1]:{relay.port} {key}\n")
        if not log.exists():
            log.touch()
        yield Link("20 ms RTT", f"ssh -p {relay.port} postgres@127.0.0.1", log, port, note)
    finally:
        if relay is not None:
            relay.close()
        known_hosts.write_text(saved_known_hosts)
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
        if made_namespace:
            run(["ip", "netns", "del", namespace], check=False)


# -- the three ways ------------------------------------------------------------------------------

def count_connections(log: Path, port: int, offset: int) -> int:
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    return len(re.findall(rf"Connection from \S+ port \d+ on \S+ port {port}\b", text))


class Service:
    """The service as the Barman user, running the package copied into the sandbox."""

    def __init__(self, box: Dict[str, str], code: Path, service_conf: Path, multiplex: bool) -> None:
        self.port = free_port()
        env = [f"PG_BACKUP_API_BARMAN_CONF={box['BARMAN_CONF']}", f"PG_BACKUP_API_CONFIG={service_conf}",
               f"PG_BACKUP_API_SSH_MULTIPLEX={'on' if multiplex else 'off'}", f"PYTHONPATH={code}",
               f"PATH={VENV}/bin:/usr/bin:/bin", f"HOME={box['BARMAN_UNIX_HOME']}"]
        self.log = Path(box["LOG_DIR"]) / f"bench-service-{self.port}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["runuser", "-u", box["BARMAN_USER"], "--", "env", *env, f"{VENV}/bin/python", "-m",
                 "pg_backup_api", "serve", "--port", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if http(self.port, "GET", "/status")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"bench: the service did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)

    def post_recovery(self, server: str, backup: str, ssh: str, destination: str) -> str:
        status, doc = http(self.port, "POST", f"/servers/{server}/operations",
                           {"type": "recovery", "backup_id": backup, "remote_ssh_command": ssh,
                            "destination_directory": destination})
        if status != 202:
            raise SystemExit(f"bench: the recovery POST answered {status}: {doc}")
        return doc["operation_id"]

    def wait(self, server: str, op_id: str, poll: float = 0.05) -> dict:
        """The operation's status once it has ended."""
        while True:
            _, state = http(self.port, "GET", f"/servers/{server}/operations/{op_id}")
            if state["status"] != "IN_PROGRESS":
                return state
            # Polled every 50 ms: each status read costs the service CPU that Barman's ssh would use.
            time.sleep(poll)

    def recover(self, server: str, backup: str, ssh: str, destination: str) -> float:
        start = time.perf_counter()
        state = self.wait(server, self.post_recovery(server, backup, ssh, destination))
        elapsed = time.perf_counter() - start
        if state["status"] != "DONE":
            raise SystemExit(f"bench: the recovery through the service failed: {state.get('output')}")
        return elapsed


@dataclass
class Measured:
    seconds: List[float] = field(default_factory=list)
    connections: List[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class RestoreBench:
    def __init__(self, runs: int, with_latency: bool, strict: bool) -> None:
        self.runs, self.with_latency, self.strict = runs, with_latency, strict
        self.rows: List[str] = []
        self.notes: List[str] = []
        self.targets_met = True

    def main(self) -> int:
        if os.geteuid() != 0:
            raise SystemExit("bench: --restore builds the sandbox (users, sshd, PostgreSQL): run it as root")
        sandbox = Path(tempfile.mkdtemp(prefix="pgba-bench-"))
        started = time.monotonic()
        try:
            try:
                box = stack.up(sandbox, **{**stack.environment_settings(os.environ), "pg_port": free_port(),
                                            "ssh_port": free_port(), "venv": VENV, "cron_interval": 0})
            except stack.SandboxError as error:
                raise SystemExit(f"bench: the sandbox did not come up: {error}") from None
            say(f"sandbox up in {time.monotonic() - started:.0f} s")
            self.measure_all(box, sandbox)
        finally:
            if (sandbox / ".sandbox").exists():
                stack.down(sandbox, purge=True)
            shutil.rmtree(sandbox, ignore_errors=True)
        print(f"{self.title()}; {time.monotonic() - started:.0f} s in all")
        for line in self.rows:
            print(line)
        for note in self.notes:
            print(f"  {note}")
        return 1 if self.strict and not self.targets_met else 0

    def title(self) -> str:
        return f"recovery: {BY_HAND} / {MUX} / {PLAIN}; medians of {self.runs} alternating runs"

    def service_settings(self) -> str:
        """The service's settings file (read by the service and its workers)."""
        return "[api]\n"

    def measure_all(self, box: Dict[str, str], sandbox: Path) -> None:
        code = sandbox / "code"
        shutil.copytree(ROOT / "pg_backup_api", code / "pg_backup_api",
                        ignore=shutil.ignore_patterns("__pycache__"))
        run(["chmod", "-R", "a+rX", str(code)])
        service_conf = sandbox / "pg-backup-api.conf"
        service_conf.write_text(self.service_settings())
        service_conf.chmod(0o644)
        services = {MUX: Service(box, code, service_conf, True), PLAIN: Service(box, code, service_conf, False)}
        try:
            self.measure_links(box, sandbox, services)
        finally:
            for service in services.values():
                service.stop()

    def measure_links(self, box: Dict[str, str], sandbox: Path, services: Dict[str, Service]) -> None:
        self.header()
        self.measure_link(box, loopback(box), services)
        if self.with_latency:
            with delayed_link(box, sandbox) as delayed:
                self.notes.append(f"20 ms RTT: {delayed.note}")
                self.measure_link(box, delayed, services)

    def header(self) -> None:
        cells = ["recovery", "link", "runs", "median s", "min-max s", "ssh connections", "x by hand", "target",
                 "verdict"]
        self.rows.append("| " + " | ".join(cells) + " |")
        self.rows.append("|" + "|".join("---" for _ in cells) + "|")

    def measure_link(self, box: Dict[str, str], link: Link, services: Dict[str, Service]) -> None:
        server, backup = box["BARMAN_SERVER"], box["BACKUP_ID"]
        results = {v: Measured() for v in VARIANTS}
        size = 0
        for i in range(self.runs):
            # Alternate the order, so no way always runs first (cold caches) or last.
            order = VARIANTS[i % 3:] + VARIANTS[:i % 3]
            for variant in order:
                destination = f"{box['RESTORE_PARENT']}/bench-{link.name.split()[0]}-{i}-{VARIANTS.index(variant)}"
                offset = link.sshd_log.stat().st_size
                if variant == BY_HAND:
                    seconds = self.by_hand(box, link.ssh_command, destination)
                else:
                    seconds = services[variant].recover(server, backup, link.ssh_command, destination)
                time.sleep(0.3)  # sshd writes its log line as the connection is accepted; let it land
                results[variant].seconds.append(seconds)
                results[variant].connections.append(count_connections(link.sshd_log, link.sshd_port, offset))
                size = int(run(["du", "-sb", destination]).stdout.split()[0])
                shutil.rmtree(destination)
                say(f"{link.name}, run {i + 1}: {variant}: {seconds:.2f} s, "
                    f"{results[variant].connections[-1]} ssh connections")
        hand = results[BY_HAND].median
        for variant in VARIANTS:
            m = results[variant]
            ratio = m.median / hand
            target, verdict = "", ""
            if variant == MUX and link.name == "loopback":
                # The service's look at the recovery's paths when it accepts it, then the worker's master.
                target = f"<= {TARGET_RATIO} x by hand, 2 connections"
                met = ratio <= TARGET_RATIO and statistics.median(m.connections) == 2
                verdict = "(quick)" if self.runs == 1 and not self.with_latency else "met" if met else "MISSED"
                self.targets_met &= met
            self.rows.append(f"| {variant} | {link.name} | {len(m.seconds)} | {m.median:.2f} | "
                             f"{min(m.seconds):.2f}-{max(m.seconds):.2f} | "
                             f"{statistics.median(m.connections):g} | {ratio:.2f} | {target} | {verdict} |")
        self.notes.append(f"{link.name}: backup {backup}, {size / 1e6:.0f} MB restored each time; connections per run: "
                          + "; ".join(f"{v}: {results[v].connections}" for v in VARIANTS))

    def by_hand(self, box: Dict[str, str], ssh: str, destination: str) -> float:
        start = time.perf_counter()
        done = run(by_hand_argv(box, ssh, destination), check=False)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"bench: barman restore by hand failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return elapsed


def loopback(box: Dict[str, str]) -> Link:
    return Link("loopback", box["SSH_COMMAND"], Path(box["LOG_DIR"]) / "sshd.log", int(box["SSH_PORT"]))


def by_hand_argv(box: Dict[str, str], ssh: str, destination: str) -> List[str]:
    """`barman restore` as the barman user, with the sandbox's configuration."""
    return ["runuser", "-u", box["BARMAN_USER"], "--", "env", "-i", f"HOME={box['BARMAN_UNIX_HOME']}",
            f"PATH={VENV}/bin:{box['PGBIN']}:/usr/bin:/bin", f"{VENV}/bin/barman", "-c", box["BARMAN_CONF"],
            "restore", f"--remote-ssh-command={ssh}", "--", box["BARMAN_SERVER"], box["BACKUP_ID"], destination]


def main(runs: int, with_latency: bool, strict: bool = False) -> int:
    return RestoreBench(runs, with_latency, strict).main()
