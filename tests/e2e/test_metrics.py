"""GET /metrics on the real stack: Barman's catalogue and `barman check` as Barman itself reports them,
and a real recovery counted once, the same by a new process of the service."""

import json
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import VENV, Service, wait_for

pytestmark = pytest.mark.e2e


def barman(sandbox, *args: str):
    done = subprocess.run(["runuser", "-u", sandbox["BARMAN_USER"], "--", "env", f"HOME={sandbox['BARMAN_HOME']}",
                           str(VENV / "bin" / "barman"), "-c", sandbox["BARMAN_CONF"], "-f", "json", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def samples(service, name):
    """{labels as a sorted tuple: value} of one metric in a scrape."""
    response = service.get("/metrics")
    assert response.status_code == 200, response.text
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def one(service, name, **labels):
    return samples(service, name).get(tuple(sorted(labels.items())), 0)


def test_the_catalogue_and_the_checks_are_barmans(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    backups = barman(sandbox, "list-backups", server)[server]
    done = [b for b in backups if b["status"] == "DONE"]
    failed = [b for b in backups if b["status"] == "FAILED"]
    assert done, backups
    assert one(service, "barman_backups_total", server=server) == len(done) + len(failed)
    assert one(service, "barman_backups_failed", server=server) == len(failed)
    # The first scrape asked for a `barman check` in the background; its results come with a later one.
    wait_for(lambda: samples(service, "pgba_check_timestamp_seconds"), timeout=120, interval=1,
             what="the background barman check")
    checks = barman(sandbox, "check", server)[server]
    up = {dict(labels)["check"]: value for labels, value in samples(service, "barman_up").items()
          if dict(labels)["server"] == server}
    # Barman's own names for its checks, each 1 or 0; the values are those of the background run, and
    # a check may have changed since, so only the one the sandbox guarantees is compared.
    assert set(up) == set(checks), (up, checks)
    assert set(up.values()) <= {0, 1}
    assert up["postgresql"] == 1 and checks["postgresql"]["status"] == "OK"


def test_a_real_recovery_is_counted_once_and_a_new_process_agrees_from_what_the_index_kept(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    succeeded = {"server": server, "type": "recovery", "state": "succeeded"}
    before = one(service, "pgba_operations", **succeeded)
    timed = one(service, "pgba_operation_duration_seconds_count", type="recovery", outcome="succeeded")
    body = {"type": "recovery", "backup_id": "latest", "destination_directory": sandbox.restore_dir("e2e-metrics"),
            "remote_ssh_command": sandbox["SSH_COMMAND"]}
    response = service.post(f"/servers/{server}/operations", json=body)
    assert response.status_code == 202, response.text
    op_id = response.json()["operation_id"]
    assert one(service, "pgba_operations_in_progress", server=server) >= 1
    assert service.wait_until_ended(server, op_id)["status"] == "DONE"
    assert one(service, "pgba_operations", **succeeded) == before + 1
    assert one(service, "pgba_operation_duration_seconds_count", type="recovery", outcome="succeeded") == timed + 1

    kept = Path(sandbox["BARMAN_HOME"]) / server / "jobs" / ".index" / "ends.json"
    assert json.loads(kept.read_text())["ends"][op_id][0] == {"success": True, "state": "succeeded"}
    other = Service(sandbox).start()
    try:
        assert samples(other, "pgba_operations") == samples(service, "pgba_operations")
        assert (samples(other, "pgba_operation_duration_seconds_bucket")
                == samples(service, "pgba_operation_duration_seconds_bucket"))
    finally:
        other.stop()
