"""Shared fixtures: a real Barman configuration and catalogue written to tmp_path."""

from __future__ import annotations

import getpass
import hashlib
import ipaddress
import socket
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest

from pg_backup_api import create_app
from pg_backup_api.core.errors import Unprocessable
from pg_backup_api.rules import effects, ssh_command
from pg_backup_api.rules.settings import Settings
from pg_backup_api.worker import target_probe

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll *predicate* until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not met within {timeout} s")


def operation_status(client: Any, op_id: str) -> Any:
    """GET server pg's operation *op_id* through a Flask test client; it must answer 200."""
    response = client.get(f"/servers/pg/operations/{op_id}")
    assert response.status_code == 200, response.json
    return response.json


def operation_ended(client: Any, op_id: str, timeout: float = 20.0, interval: float = 0.05) -> Any:
    """The operation's status once it is no longer IN_PROGRESS."""
    return wait_for(lambda: (doc := operation_status(client, op_id))["status"] != "IN_PROGRESS" and doc,
                    timeout=timeout, interval=interval, what=f"operation {op_id} ends")


@dataclass
class BarmanFiles:
    """A Barman configuration (barman.conf + barman.d/) and a backup catalogue, all real files."""

    root: Path
    conf: Path = field(init=False)
    home: Path = field(init=False)
    conf_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.conf = self.root / "barman.conf"
        self.home = self.root / "home"
        self.conf_dir = self.root / "barman.d"
        self.home.mkdir()
        self.conf_dir.mkdir()
        self.conf.write_text(textwrap.dedent(f"""\
            [barman]
            barman_home = {self.home}
            barman_user = {getpass.getuser()}
            configuration_files_directory = {self.conf_dir}
            log_file = {self.root}/barman.log
            """))
        self.add_server("pg")

    def add_server(self, name: str) -> None:
        (self.conf_dir / f"{name}.conf").write_text(textwrap.dedent(f"""\
            [{name}]
            description = "test server {name}"
            conninfo = host=/nonexistent dbname=postgres
            streaming_conninfo = host=/nonexistent
            backup_method = postgres
            streaming_archiver = on
            slot_name = barman
            """))

    def add_backup(self, backup_id: str, status: str = "DONE", name: Optional[str] = None,
                   server: str = "pg") -> None:
        """A backup.info as Barman 3.19 writes it for a streamed backup (backup_method postgres)."""
        meta = self.home / server / "meta"
        meta.mkdir(parents=True, exist_ok=True)
        info = {
            "backup_id": backup_id, "status": status, "mode": "postgres", "server_name": server,
            "begin_time": "2026-11-27 01:00:00.000000+00:00", "end_time": "2026-11-27 01:00:02.000000+00:00",
            "begin_wal": "000000010000000000000003", "end_wal": "000000010000000000000003",
            "begin_xlog": "0/3000028", "end_xlog": "0/4000000", "begin_offset": "40", "end_offset": "0",
            "timeline": "1", "version": "150018", "size": "30702363", "deduplicated_size": "30702363",
            "cluster_size": "30829616", "pgdata": "/srv/pg/data", "systemid": "7712678398115002518",
            "xlog_segment_size": "16777216", "copy_stats": "{'copy_time': 1.6, 'total_time': 1.6}",
            "data_checksums": "off", "tablespaces": "None", "compression": "None", "encryption": "None",
            "error": "None" if status == "DONE" else "failure during backup",
        }
        if name:
            info["backup_name"] = name
        (meta / f"{backup_id}-backup.info").write_text("".join(f"{k}={v}\n" for k, v in info.items()))


def address_in_tests(host: str) -> str:
    """The address a host name of the unit tests resolves to: one of 198.18.0.0/15 (set aside for tests) of its own."""
    digest = int.from_bytes(hashlib.sha256(host.lower().encode()).digest()[:2], "big")
    return str(ipaddress.ip_address("198.18.0.0") + digest * 2 + 1)


@pytest.fixture(autouse=True)
def name_resolution(request, monkeypatch) -> None:
    """Unit tests name hosts such as db2 that no resolver knows: each resolves to address_in_tests(name), a
    name under .invalid to nothing, an address to itself. The end-to-end tests resolve for real."""
    if request.node.get_closest_marker("e2e"):
        return
    real = ssh_command.addresses_of

    def addresses_of(host: str, port: int, family: str) -> list:
        try:
            socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        except socket.gaierror:  # a name, not an address in any spelling getaddrinfo reads
            if host.lower().rstrip(".").endswith(".invalid"):
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
            return [address_in_tests(host)]
        return real(host, port, family)

    monkeypatch.setattr(ssh_command, "addresses_of", addresses_of)


@pytest.fixture
def barman_files(tmp_path: Path) -> BarmanFiles:
    return BarmanFiles(tmp_path)


@dataclass
class SpawnRecorder:
    """Stands in for the detached worker at the process seam: records what would have run."""

    calls: List[Tuple[str, str, str]] = field(default_factory=list)
    fail: bool = False

    def __call__(self, op_type, server, op_id, store, barman_conf) -> None:
        if self.fail:
            raise OSError("no such file: setsid")
        self.calls.append((op_type.value, server, op_id))


@pytest.fixture
def spawned() -> SpawnRecorder:
    return SpawnRecorder()


@dataclass
class FakeTarget:
    """Stands in for the target host at the process seam (target_probe.probe): a path it is not told
    about is absent and leads to itself; *unreachable* makes every probe fail as ssh would."""

    paths: Dict[str, effects.OnTarget] = field(default_factory=dict)
    unreachable: Optional[str] = None
    calls: List[Tuple[Tuple[str, ...], Tuple[str, ...]]] = field(default_factory=list)

    def __call__(self, ssh_argv: Sequence[str], paths: Sequence[str]) -> Dict[str, effects.OnTarget]:
        self.calls.append((tuple(ssh_argv), tuple(paths)))
        if self.unreachable:
            raise Unprocessable(f"field 'remote_ssh_command': cannot look at the recovery's paths on the target "
                                f"host {ssh_argv[-1]}: {self.unreachable}")
        return {p: self.paths.get(p, effects.OnTarget(effects.ABSENT, p)) for p in paths}


@pytest.fixture(autouse=True)
def fake_target(request: Any, monkeypatch: Any) -> Optional[FakeTarget]:
    """Unit tests never reach a target host: its paths are a FakeTarget's (empty unless told otherwise).
    End-to-end tests ask the real one."""
    if request.node.get_closest_marker("e2e") is not None:
        return None
    target = FakeTarget()
    monkeypatch.setattr(target_probe, "probe", target)
    return target


@pytest.fixture
def app(barman_files: BarmanFiles, spawned: SpawnRecorder):
    return create_app(Settings(barman_conf=str(barman_files.conf)), spawn=spawned)


@pytest.fixture
def client(app):
    return app.test_client()


def install_stand_in_barman(tmp_path: Path, monkeypatch: Any, barman_files: BarmanFiles, script: str,
                            service_conf: str = "[api]\n") -> Path:
    """A stand-in `barman` (*script*) that the real detached worker runs, with this checkout's package,
    the service settings *service_conf* (none from /etc) and a DONE backup to recover."""
    exe = tmp_path / "bin" / "barman"
    exe.parent.mkdir()
    exe.write_text(script)
    exe.chmod(0o755)
    settings = tmp_path / "pg-backup-api.conf"
    settings.write_text(service_conf)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("PG_BACKUP_API_BARMAN", str(exe))
    monkeypatch.setenv("PG_BACKUP_API_CONFIG", str(settings))
    monkeypatch.setenv("PG_BACKUP_API_BARMAN_CONF", str(barman_files.conf))
    barman_files.add_backup("20261127T010000")
    return exe
