"""An operator's allowed_destinations holds for every path a recovery writes, on the real service."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from .conftest import Service
from .test_pitr import promoted_copy, rows_around_a_restore_point
from .test_security import count_jobs

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def restricted(sandbox) -> Iterator[Service]:
    """The service with recoveries of the sandbox's server allowed only under RESTORE_PARENT."""
    policy = sandbox.directory / "policy-effects.conf"
    policy.write_text(f"[server {sandbox['BARMAN_SERVER']}]\nallowed_destinations = {sandbox['RESTORE_PARENT']}\n")
    os.chmod(policy, 0o644)
    service = Service(sandbox, {"PG_BACKUP_API_CONFIG": str(policy)}).start()
    yield service
    service.stop()


def recovery(sandbox, **fields) -> dict:
    return {"type": "recovery", "backup_id": "latest", "remote_ssh_command": sandbox["SSH_COMMAND"], **fields}


def test_a_staging_wal_directory_outside_the_policy_is_refused_and_stores_nothing(sandbox, restricted):
    outside = str(sandbox.directory / "elsewhere" / "wal")
    before = count_jobs(sandbox)
    response = restricted.post(f"/servers/{sandbox['BARMAN_SERVER']}/operations", json=recovery(
        sandbox, destination_directory=sandbox.restore_dir("e2e-effects-staging"), target_name="any",
        staging_wal_directory=outside))
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith(f"field 'staging_wal_directory': {outside} is not under an "
                                               f"allowed destination of server '{sandbox['BARMAN_SERVER']}'")
    assert count_jobs(sandbox) == before
    assert not Path(outside).exists()


def test_a_tablespace_location_outside_the_policy_is_refused_before_its_name_is_looked_up(sandbox, restricted):
    # The sandbox's backups have no tablespace: the path rule is what refuses this mapping (422),
    # since the same unknown name with a location inside the policy gets the catalogue's 400.
    server = sandbox["BARMAN_SERVER"]
    destination = sandbox.restore_dir("e2e-effects-tbs")
    before = count_jobs(sandbox)
    outside = restricted.post(f"/servers/{server}/operations", json=recovery(
        sandbox, destination_directory=destination, tablespaces={"tbs1": str(sandbox.directory / "tbs1")}))
    assert outside.status_code == 422, outside.text
    assert outside.json()["error"].startswith("field 'tablespaces.tbs1': ")
    assert "is not under an allowed destination" in outside.json()["error"]
    inside = restricted.post(f"/servers/{server}/operations", json=recovery(
        sandbox, destination_directory=destination, tablespaces={"tbs1": sandbox.restore_dir("e2e-effects-tbs1")}))
    assert inside.status_code == 400, inside.text
    assert "tbs1 not in backup" in inside.json()["error"]
    assert count_jobs(sandbox) == before


def test_a_point_in_time_recovery_staging_wal_inside_the_policy_ends_done_and_postgres_removes_it(
        sandbox, restricted):
    rows_around_a_restore_point(sandbox, "effects_rows", "effects_point", 3, 6)

    server = sandbox["BARMAN_SERVER"]
    destination = sandbox.restore_dir("e2e-effects-pitr")
    staging = sandbox.restore_dir("e2e-effects-pitr-wal")
    response = restricted.post(f"/servers/{server}/operations", json=recovery(
        sandbox, destination_directory=destination, target_name="effects_point", target_action="promote",
        staging_wal_directory=staging))
    assert response.status_code == 202, response.text
    status = restricted.wait_until_ended(server, response.json()["operation_id"])
    assert status["status"] == "DONE", status.get("output")
    assert status["staging_wal_directory"] == staging
    assert any(Path(staging).iterdir())  # Barman staged the WAL there
    with promoted_copy(sandbox, destination) as copy_port:
        assert sandbox.psql(copy_port, "SELECT count(*), max(id) FROM effects_rows") == "3|3"
    # The declared effect: PostgreSQL ran recovery_end_command = 'rm -fr <staging>' at the end of recovery.
    assert not Path(staging).exists()
