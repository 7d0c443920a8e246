"""Shared fixtures: a real Barman configuration and catalogue written to tmp_path."""

from __future__ import annotations

import getpass
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from pg_backup_api import create_app
from pg_backup_api.settings import Settings


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
        meta = self.home / server / "meta"
        meta.mkdir(parents=True, exist_ok=True)
        lines = [f"backup_id={backup_id}", f"status={status}",
                 "begin_time=2026-11-27 01:00:00.000000+00:00",
                 "end_time=2026-11-27 01:00:02.000000+00:00"]
        if name:
            lines.append(f"backup_name={name}")
        (meta / f"{backup_id}-backup.info").write_text("\n".join(lines) + "\n")


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


@pytest.fixture
def app(barman_files: BarmanFiles, spawned: SpawnRecorder):
    return create_app(Settings(barman_conf=str(barman_files.conf)), spawn=spawned)


@pytest.fixture
def client(app):
    return app.test_client()
