"""The real stack for end-to-end tests: PostgreSQL, Barman, sshd (scripts/sandbox) and the service.

With CI=true nothing here may skip: a missing component fails the run.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = ROOT / "scripts" / "sandbox"
VENV = Path(os.environ.get("PGBA_VENV", "/opt/pg-backup-api/venv"))
IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Skip on a developer machine that lacks the stack; fail in CI, where it must be there."""
    if IN_CI:
        pytest.fail(f"end-to-end stack unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"end-to-end stack unavailable: {reason} (run scripts/bootstrap as root)")


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    """Poll *predicate* until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not met within {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env(path: Path) -> Dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


@dataclass
class Sandbox:
    directory: Path
    env: Dict[str, str]

    def __getitem__(self, key: str) -> str:
        return self.env[key]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(SANDBOX), *args], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, check=check, timeout=600)

    def psql(self, port: int, sql: str) -> str:
        return self.run("psql", str(self.directory), str(port), sql).stdout.strip()

    def start_copy(self, datadir: str) -> int:
        port = free_port()
        self.run("start-copy", str(self.directory), datadir, str(port))
        return port

    def stop_copy(self, datadir: str) -> None:
        self.run("stop-copy", str(self.directory), datadir, check=False)

    @contextmanager
    def copy(self, datadir: str) -> Iterator[int]:
        """A restored cluster started for the duration of the block; its port."""
        port = self.start_copy(datadir)
        try:
            yield port
        finally:
            self.stop_copy(datadir)

    def restore_dir(self, name: str) -> str:
        return f"{self['RESTORE_PARENT']}/{name}"


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    if os.geteuid() != 0:
        unavailable("the sandbox creates users and runs services: run the tests as root")
    for needed in [SANDBOX, VENV / "bin" / "barman", VENV / "bin" / "pg-backup-api"]:
        if not needed.exists():
            unavailable(f"{needed} is missing")
    directory = Path(tempfile.mkdtemp(prefix="pgba-e2e-"))
    env = {**os.environ, "SANDBOX_PGPORT": str(free_port()), "SANDBOX_SSH_PORT": str(free_port()),
           "PGBA_VENV": str(VENV)}
    up = subprocess.run([str(SANDBOX), "up", str(directory)], stdin=subprocess.DEVNULL, env=env,
                        capture_output=True, text=True, timeout=900)
    box = Sandbox(directory, {})
    try:
        if up.returncode != 0:
            pytest.fail(f"scripts/sandbox up failed:\n{up.stdout}\n{up.stderr}", pytrace=False)
        box.env = read_env(directory / "env")
        yield box
    finally:
        subprocess.run([str(SANDBOX), "down", str(directory), "--purge"], stdin=subprocess.DEVNULL,
                       env=env, capture_output=True, timeout=300)


class Service:
    """pg-backup-api run as the Barman user, the way it runs in production."""

    def __init__(self, sandbox: Sandbox, extra_env: Optional[Dict[str, str]] = None) -> None:
        self.sandbox = sandbox
        self.extra_env = extra_env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = sandbox.directory / "log" / f"service-{self.port}.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Service":
        user = self.sandbox["BARMAN_USER"]
        argv = ["runuser", "-u", user, "--", "env", f"PG_BACKUP_API_BARMAN_CONF={self.sandbox['BARMAN_CONF']}",
                f"PATH={VENV}/bin:/usr/bin:/bin", f"HOME={self.sandbox['BARMAN_HOME']}",
                *(f"{k}={v}" for k, v in self.extra_env.items()),
                str(VENV / "bin" / "pg-backup-api"), "serve", "--port", str(self.port)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/status", timeout=1).json() == "OK":
                    return self
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"the service did not start:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **kw)

    def wait_until_ended(self, server: str, op_id: str, timeout: float = 300,
                         headers: Optional[Dict[str, str]] = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.get(f"/servers/{server}/operations/{op_id}", headers=headers).json()
            if status["status"] != "IN_PROGRESS":
                return status
            time.sleep(0.5)
        raise AssertionError(f"operation {op_id} still IN_PROGRESS after {timeout} s")


@pytest.fixture(scope="session")
def service(sandbox: Sandbox) -> Iterator[Service]:
    svc = Service(sandbox).start()
    yield svc
    svc.stop()
