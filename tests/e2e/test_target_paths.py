"""A recovery's paths as the target host sees them, on the real stack: a staging directory that holds
files is never handed to PostgreSQL's rm -fr, and a symbolic link cannot lead a restore out of
allowed_destinations."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from .conftest import Service, wait_for
from .test_effects import recovery, restricted  # noqa: F401  (restricted: the fixture, with allowed_destinations)
from .test_lifecycle import copying, worker_pid
from .test_pitr import promoted_copy, rows_around_a_restore_point
from .test_security import count_jobs

pytestmark = pytest.mark.e2e


def tree(directory: Path) -> dict:
    """Every file under *directory* and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_staging_directory_that_holds_files_is_refused_and_kept(sandbox, service):
    # What the hostile tester found: another cluster's data directory as staging_wal_directory.
    staging = sandbox.holding_files("e2e-staging-pgdata", {"PG_VERSION": b"15\n", "base/1/1259": os.urandom(8192)})
    before, kept = count_jobs(sandbox), tree(staging)
    response = service.post(f"/servers/{sandbox['BARMAN_SERVER']}/operations", json=recovery(
        sandbox, destination_directory=sandbox.restore_dir("e2e-staging-refused"), target_name="any",
        staging_wal_directory=str(staging)))
    assert response.status_code == 409, response.text
    assert response.json()["error"] == (
        f"field 'staging_wal_directory': {staging} is a directory that holds files on the target host; PostgreSQL "
        f"would delete it and everything in it at the end of recovery (recovery_end_command 'rm -fr {staging}'): "
        "name a directory that does not exist or is empty")
    assert count_jobs(sandbox) == before
    assert tree(staging) == kept
    assert not Path(sandbox.restore_dir("e2e-staging-refused")).exists()


def test_a_point_in_time_recovery_staging_wal_in_an_empty_directory_ends_done(sandbox, service):
    rows_around_a_restore_point(sandbox, "staging_empty_rows", "staging_empty_point", 4, 7)
    server = sandbox["BARMAN_SERVER"]
    staging = Path(sandbox.restore_dir("e2e-staging-empty"))
    sandbox.as_target_user("mkdir", "-m", "700", str(staging))
    destination = sandbox.restore_dir("e2e-staging-empty-pitr")
    response = service.post(f"/servers/{server}/operations", json=recovery(
        sandbox, destination_directory=destination, target_name="staging_empty_point", target_action="promote",
        staging_wal_directory=str(staging)))
    assert response.status_code == 202, response.text
    status = service.wait_until_ended(server, response.json()["operation_id"])
    assert status["status"] == "DONE", status.get("output")
    assert any(staging.iterdir())  # Barman staged the WAL there
    with promoted_copy(sandbox, destination) as port:
        assert sandbox.psql(port, "SELECT count(*), max(id) FROM staging_empty_rows") == "4|4"
    assert not staging.exists()  # PostgreSQL's recovery_end_command removed it, as declared


def test_a_symlink_inside_an_allowed_destination_pointing_outside_is_refused(sandbox, restricted):  # noqa: F811
    # The target's own user makes a link inside the allowed tree (RESTORE_PARENT) to a place outside it.
    outside = sandbox.directory / "outside-the-policy"
    outside.mkdir()
    os.chown(outside, *target_ids(sandbox))
    link = Path(sandbox.restore_dir("e2e-link-out"))
    sandbox.as_target_user("ln", "-s", str(outside), str(link))
    before = count_jobs(sandbox)
    response = restricted.post(f"/servers/{sandbox['BARMAN_SERVER']}/operations", json=recovery(
        sandbox, destination_directory=f"{link}/restore"))
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith(
        f"field 'destination_directory': {link}/restore resolves on the target host to {outside}/restore, which is "
        f"not under an allowed destination of server '{sandbox['BARMAN_SERVER']}'")
    assert count_jobs(sandbox) == before
    assert list(outside.iterdir()) == []


def target_ids(sandbox) -> tuple:
    st = Path(sandbox["RESTORE_PARENT"]).stat()
    return st.st_uid, st.st_gid


@pytest.fixture(scope="module")
def one_at_a_time(sandbox) -> Iterator[Service]:
    """The service with one recovery at a time per host: the next one waits, queued."""
    service = Service(sandbox, {"PG_BACKUP_API_MAX_RECOVERIES_PER_HOST": "1"}).start()
    yield service
    service.stop()


def test_a_staging_directory_filled_while_the_recovery_waited_fails_it_before_barman_starts(sandbox, one_at_a_time):
    server = sandbox["BARMAN_SERVER"]
    service = one_at_a_time
    # Slowed down (KB/s) so that it holds the host's one slot while the second recovery waits.
    first = service.post(f"/servers/{server}/operations", json=recovery(
        sandbox, destination_directory=sandbox.restore_dir("e2e-staging-slot-holder"), bwlimit=500))
    assert first.status_code == 202, first.text
    first_id = first.json()["operation_id"]
    wait_for(lambda: copying(worker_pid(sandbox, first_id)), what="the first recovery copies")
    staging = Path(sandbox.restore_dir("e2e-staging-filled-later"))
    second = service.post(f"/servers/{server}/operations", json=recovery(
        sandbox, destination_directory=sandbox.restore_dir("e2e-staging-filled-later-pitr"), target_name="any",
        staging_wal_directory=str(staging)))
    assert second.status_code == 202, second.text  # absent at POST time
    second_id = second.json()["operation_id"]
    wait_for(lambda: service.get(f"/servers/{server}/operations/{second_id}").json()["state"] == "queued")
    sandbox.holding_files(staging.name, {"base.conf": b"filled while it waited\n"})
    service.post(f"/servers/{server}/operations/{first_id}/cancel")
    status = service.wait_until_ended(server, second_id)
    assert (status["status"], status["state"]) == ("FAILED", "failed"), status
    assert status["reason"].startswith(f"field 'staging_wal_directory': {staging} is a directory that holds files "
                                       "on the target host; PostgreSQL would delete it"), status["reason"]
    assert "pg-backup-api: barman not started: " in status["output"]
    assert "Starting remote restore" not in status["output"]
    assert tree(staging) == {"base.conf": b"filled while it waited\n"}
    assert not Path(sandbox.restore_dir("e2e-staging-filled-later-pitr")).exists()
