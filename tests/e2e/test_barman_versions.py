"""The supported Barman range, proven on the real stack: each Barman release gets its own venv (scripts/barman-venv),
its own sandbox (Barman home, PostgreSQL 15 cluster, backup) and the service run from that venv; recovery with the
rows read back, point-in-time recovery, a backup and a configuration operation where the release has them, and a
422 naming the version for what it lacks.

PGBA_BARMAN_VERSIONS lists the releases (default: the oldest and the newest supported); bench/barman-versions runs
the whole matrix. With PGBA_BARMAN_MATRIX_RESULTS set, each test that passes appends `version<TAB>feature<TAB>how`
to that file (the README's table is made from it).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from pg_backup_api.barman_io import features as barman_features

from .conftest import ROOT, Sandbox, Service, sandbox_down, sandbox_up, unavailable, wait_for

pytestmark = pytest.mark.e2e

OLDEST_AND_NEWEST = "3.4.0 3.20.1"
VERSIONS = os.environ.get("PGBA_BARMAN_VERSIONS", OLDEST_AND_NEWEST).split()
RESULTS = os.environ.get("PGBA_BARMAN_MATRIX_RESULTS")


@dataclass
class Stack:
    version: str
    features: barman_features.BarmanFeatures
    venv: Path
    sandbox: Sandbox
    service: Service

    @property
    def server(self) -> str:
        return self.sandbox["BARMAN_SERVER"]

    def post(self, body: dict, path: str = "") -> "object":
        return self.service.post(path or f"/servers/{self.server}/operations", json=body)

    def run(self, body: dict) -> dict:
        """POST an operation of this server; its final status."""
        response = self.post(body)
        assert response.status_code == 202, response.text
        return self.service.wait_until_ended(self.server, response.json()["operation_id"])

    def barman(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", self.sandbox["BARMAN_USER"], "--", "env",
                               f"HOME={self.sandbox['BARMAN_HOME']}", str(self.venv / "bin" / "barman"),
                               "-c", self.sandbox["BARMAN_CONF"], *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)

    def record(self, feature: str, how: str = "passed") -> None:
        if RESULTS:
            with open(RESULTS, "a") as out:
                out.write(f"{self.version}\t{feature}\t{how}\n")

    def refused(self, key: str, response: "object") -> None:
        """*response* is the 422 naming feature *key* and the Barman it needs."""
        feature = barman_features.BY_KEY[key]
        assert response.status_code == 422, response.text
        assert response.json() == {"error": f"{feature.what} needs Barman >= {barman_features.shown(feature.minimum)}"
                                            f"; this host has {self.version}"}


@pytest.fixture(scope="module", params=VERSIONS)
def stack(request) -> Iterator[Stack]:
    version = request.param
    if os.geteuid() != 0:
        unavailable("the Barman version matrix builds venvs and sandboxes: run the tests as root")
    built = subprocess.run(["bash", str(ROOT / "scripts" / "barman-venv"), version], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=1200)
    if built.returncode != 0:
        unavailable(f"scripts/barman-venv {version} failed: {built.stderr.strip()[-2000:]}")
    venv = Path(built.stdout.strip().splitlines()[-1])
    # A Barman user of its own (unless SANDBOX_BARMAN_USER names one): other sandboxes of this machine come and
    # go with theirs, and would move its home (and the known_hosts ssh reads) under a running recovery.
    box = sandbox_up(f"pgba-barman-{version}-", venv=venv,
                     barman_user=os.environ.get("SANDBOX_BARMAN_USER") or "barman-versions")
    try:
        service = Service(box, venv=venv).start()
        try:
            yield Stack(version, barman_features.from_version(version), venv, box, service)
        finally:
            service.stop()
    finally:
        sandbox_down(box.directory)


def archive_current_wal(stack: Stack) -> None:
    """`barman switch-wal --archive`, with commits meanwhile so pg_receivewal closes the segment soon."""
    done = threading.Event()
    port = int(stack.sandbox["PGPORT"])

    def tick() -> None:
        while not done.wait(0.5):
            stack.sandbox.psql(port, "SELECT txid_current()")

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        archived = stack.barman("switch-wal", "--force", "--archive", "--archive-timeout", "60", stack.server)
        assert archived.returncode == 0, archived.stdout + archived.stderr
    finally:
        done.set()
        ticker.join()


def test_the_service_runs_on_this_barman_and_names_its_version(stack):
    servers = stack.service.get("/servers").json()
    assert servers["barman"]["version"] == stack.version
    assert [f["feature"] for f in servers["barman"]["lacks"]] == [f.key for f in stack.features.lacking()]
    assert [s["name"] for s in servers["servers"]] == [stack.server]
    metrics = stack.service.get("/metrics")
    assert metrics.status_code == 200
    assert f'version="{stack.version}"' in next(line for line in metrics.text.splitlines()
                                                 if line.startswith("pgba_barman_info{"))
    assert stack.service.get("/openapi.json").json()["info"]["x-barman-version"] == stack.version
    doctor = subprocess.run(["runuser", "-u", stack.sandbox["BARMAN_USER"], "--", "env",
                             f"HOME={stack.sandbox['BARMAN_HOME']}",
                             f"PG_BACKUP_API_BARMAN_CONF={stack.sandbox['BARMAN_CONF']}",
                             str(stack.venv / "bin" / "pg-backup-api"), "doctor"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"Barman {stack.version}" in doctor.stdout
    stack.record("service, /servers, /metrics, doctor")


def test_a_recovery_of_the_latest_full_backup_restores_the_rows(stack):
    destination = stack.sandbox.restore_dir(f"versions-{stack.version}")
    status = stack.run({"type": "recovery", "backup_id": "latest-full", "destination_directory": destination,
                        "remote_ssh_command": stack.sandbox["SSH_COMMAND"]})
    assert status["status"] == "DONE", status
    assert status["resolved_backup_id"] == stack.sandbox["BACKUP_ID"]
    with stack.sandbox.copy(destination) as port:
        rows = stack.sandbox.psql(port, "SELECT count(*), md5(string_agg(label, ',' ORDER BY id)) "
                                        "FROM known_rows WHERE id <= 100")
    assert rows == stack.sandbox["ROWS_CHECK"]
    stack.record("recovery (latest-full), rows read back")


def test_a_point_in_time_recovery_keeps_what_came_before_the_target_and_nothing_after(stack):
    port = int(stack.sandbox["PGPORT"])
    stack.sandbox.psql(port, "CREATE TABLE pitr_rows (id int PRIMARY KEY, label text NOT NULL)")
    stack.sandbox.psql(port, "INSERT INTO pitr_rows SELECT g, 'before-' || g FROM generate_series(1, 10) g")
    target = stack.sandbox.psql(port, "SELECT to_char(now() AT TIME ZONE 'UTC', "
                                      "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')")
    time.sleep(1)
    stack.sandbox.psql(port, "INSERT INTO pitr_rows SELECT g, 'after-' || g FROM generate_series(11, 20) g")
    archive_current_wal(stack)
    destination = stack.sandbox.restore_dir(f"versions-pitr-{stack.version}")
    body = {"type": "recovery", "backup_id": stack.sandbox["BACKUP_ID"], "target_time": target,
            "target_action": "promote", "destination_directory": destination,
            "remote_ssh_command": stack.sandbox["SSH_COMMAND"]}
    # Each feature on its own: a Barman that has it recovers with it; one that lacks it refuses it.
    for key, field, value in (("auto", "backup_id", "auto"), ("staging_wal_directory", "staging_wal_directory",
                                                            stack.sandbox.restore_dir(f"versions-wal-{stack.version}"))):
        if stack.features.has(key):
            body[field] = value
            stack.record(key)
        else:
            stack.refused(key, stack.post({**body, field: value}))
            stack.record(key, "422")
    status = stack.run(body)
    assert status["status"] == "DONE", status
    with stack.sandbox.copy(destination) as copy_port:
        wait_for(lambda: stack.sandbox.psql(copy_port, "SELECT pg_is_in_recovery()") == "f", timeout=60,
                 interval=0.5, what="promotion of the restored cluster")
        rows = stack.sandbox.psql(copy_port, "SELECT count(*), min(label), max(id) FROM pitr_rows")
    assert rows == "10|before-1|10"
    stack.record("point-in-time recovery")


def test_a_backup_is_taken_and_listed_and_incremental_needs_its_barman(stack):
    body = {"type": "backup", "name": f"matrix-{stack.version}", "immediate_checkpoint": True, "wait_for_wals": True}
    if not stack.features.has("named_wait"):
        stack.refused("named_wait", stack.post(body))
        stack.record("named_wait", "422")
        del body["name"]
    status = stack.run(body)
    assert status["status"] == "DONE", status.get("output")
    listed = stack.service.get(f"/servers/{stack.server}/backups").json()["backups"]
    expected = {"backup_id": status["new_backup_id"], "name": body.get("name"), "status": "DONE"}
    assert expected.items() <= next(b for b in listed if b["backup_id"] == status["new_backup_id"]).items()
    stack.record("backup")
    # An incremental backup needs PostgreSQL 17 as well: on this PostgreSQL 15 only the refusal is proven.
    if not stack.features.has("incremental"):
        stack.refused("incremental", stack.post({"type": "backup", "incremental": "latest"}))
        stack.record("incremental", "422")


def test_a_config_update_is_applied_or_refused_with_the_version_it_needs(stack):
    description = f"pg-backup-api matrix on Barman {stack.version}"
    body = {"type": "config_update", "changes": [{"scope": "server", "server_name": stack.server,
                                                  "description": description}]}
    if not stack.features.has("config_update"):
        stack.refused("config_update", stack.post(body, "/operations"))
        stack.refused("config_switch", stack.post({"type": "config_switch", "reset": True}))
        stack.record("config_update", "422")
        stack.record("config_switch", "422")
        return
    user = pwd.getpwnam(stack.sandbox["BARMAN_USER"])
    server_conf = Path(stack.sandbox["BARMAN_CONF"]).parent / "barman.d" / f"{stack.server}.conf"
    os.chown(server_conf, user.pw_uid, user.pw_gid)  # barman rewrites the file that holds the key
    response = stack.post(body, "/operations")
    assert response.status_code == 202, response.text
    op_id = response.json()["operation_id"]
    status = wait_for(lambda: (lambda s: s if s["status"] != "IN_PROGRESS" else None)(
        stack.service.get(f"/operations/{op_id}").json()), timeout=120, interval=0.5, what="the config_update ends")
    assert status["status"] == "DONE", status
    wait_for(lambda: stack.service.get("/servers").json()["servers"][0]["description"] == description,
             what="the new description read back through Barman's configuration")
    stack.record("config_update")
