"""Discovery on the real stack when Barman's files or PostgreSQL fail: an unreadable backup.info is that
backup's fault alone, and /diagnose answers Barman's document while PostgreSQL is down."""

from __future__ import annotations

import os
import pwd
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from pg_backup_api.http import metrics
from tests import sandbox as stack
from tests.e2e.conftest import Sandbox, Service, barman, sandbox_down, sandbox_up, wait_for

pytestmark = pytest.mark.e2e

COPY_ID = "20000101T000000"  # older than any real backup: `latest` still names the real one


@contextmanager
def copied_backup(sandbox: Sandbox, breakage: str) -> Iterator[Path]:
    """A copy of the sandbox's real backup under COPY_ID whose backup.info the Barman user cannot read
    (*breakage*: `garbage` bytes beside the base backup, or the real file copied with mode 000); its path.
    Everything is removed afterwards."""
    server = sandbox["BARMAN_SERVER"]
    home = Path(sandbox["BARMAN_HOME"]) / server
    barman = pwd.getpwnam(sandbox["BARMAN_USER"])
    base, meta = home / "base" / COPY_ID, home / "meta" / f"{COPY_ID}-backup.info"
    real_info = home / "meta" / f"{sandbox['BACKUP_ID']}-backup.info"
    try:
        shutil.copytree(home / "base" / sandbox["BACKUP_ID"], base, symlinks=True)
        for path in [base, *base.rglob("*")]:
            os.lchown(path, barman.pw_uid, barman.pw_gid)
        if breakage == "garbage":
            broken = base / "backup.info"
            broken.write_bytes(b"\xff\xfe\x00 not a backup.info\n" + os.urandom(64))
        else:
            broken = meta
            broken.write_text(real_info.read_text().replace(sandbox["BACKUP_ID"], COPY_ID))
            broken.chmod(0)
        os.chown(broken, barman.pw_uid, barman.pw_gid)
        yield broken
    finally:
        shutil.rmtree(base, ignore_errors=True)
        meta.unlink(missing_ok=True)
        # A scrape meanwhile started the background `barman check`, which Barman fails on the broken
        # file: wait for it, and drop its results, so the next scrape asks for fresh ones.
        checks = metrics.metrics_dir(Path(sandbox["BARMAN_HOME"]))
        wait_for(lambda: not (checks / metrics.PENDING_FILE).exists(), timeout=120, what="the background check")
        (checks / metrics.CHECKS_FILE).unlink(missing_ok=True)


@pytest.mark.parametrize("breakage", ["garbage", "mode 000"])
def test_an_unreadable_backup_info_is_a_corrupt_backup_and_nothing_else_breaks(sandbox, service, breakage):
    server = sandbox["BARMAN_SERVER"]
    with copied_backup(sandbox, breakage) as broken:
        listed = service.get(f"/servers/{server}/backups")
        assert listed.status_code == 200, listed.text
        backups = {b["backup_id"]: b for b in listed.json()["backups"]}
        assert backups[sandbox["BACKUP_ID"]]["status"] == "DONE"
        assert backups[COPY_ID]["status"] == "CORRUPT"
        assert backups[COPY_ID]["corrupt_file"] == str(broken) and backups[COPY_ID]["reason"]
        recovery = service.post(f"/servers/{server}/operations", json={
            "type": "recovery", "backup_id": COPY_ID, "destination_directory": sandbox.restore_dir("corrupt"),
            "remote_ssh_command": sandbox["SSH_COMMAND"]})
        assert recovery.status_code == 422, recovery.text
        assert str(broken) in recovery.json()["error"]
        assert service.get("/servers").status_code == 200
        page = service.get("/ui/view")
        assert page.status_code == 200 and server in page.text
        metrics = service.get("/metrics").text
        assert f'barman_backups_total{{server="{server}"}}' in metrics
        assert f'pgba_backups_corrupt{{server="{server}"}} 1.0' in metrics
        # Why a recovery of any backup of this server is refused: Barman fails on the file itself.
        for argv in (["list-backups", server], ["cron"]):
            assert barman(sandbox, *argv).returncode == 1, argv
    backups = service.get(f"/servers/{server}/backups").json()["backups"]
    assert COPY_ID not in {b["backup_id"] for b in backups}


@pytest.fixture
def stopped_postgres() -> Iterator[tuple]:
    """A sandbox of its own, with the service, whose PostgreSQL is then stopped (the shared one is untouched)."""
    box = sandbox_up("pgba-e2e-pgdown-")
    service = None
    try:
        service = Service(box).start()
        stack.stop_cluster(Path(box["PGDATA"]))
        yield box, service
    finally:
        if service is not None:
            service.stop()
        sandbox_down(box.directory)


def test_diagnose_answers_barmans_document_while_postgresql_is_down(stopped_postgres):
    box, service = stopped_postgres
    response = service.get("/diagnose")
    assert response.status_code == 200, response.text
    status = response.json()["servers"][box["BARMAN_SERVER"]]["status"]
    assert status["connection_error"]  # Barman's own report that PostgreSQL does not answer
