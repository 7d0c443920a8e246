"""Discovery, taking a backup and configuration operations against the real Barman."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_discovery_reports_the_real_catalogue(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    names = [s["name"] for s in service.get("/servers").json()["servers"]]
    assert server in names
    status = service.get(f"/servers/{server}").json()
    assert status["status"]["pg_version"]["message"].startswith("15.")
    backups = service.get(f"/servers/{server}/backups").json()["backups"]
    assert sandbox["BACKUP_ID"] in [b["backup_id"] for b in backups]
    shown = service.get(f"/servers/{server}/backups/oldest").json()
    assert shown["backup_id"] == sandbox["BACKUP_ID"]
    assert shown["status"] == "DONE"
    assert shown["base_backup_information"]["timeline"] == 1
    check = service.get(f"/servers/{server}/check").json()
    assert check["ok"] is True, check
    assert {c["name"] for c in check["checks"]} >= {"postgresql", "wal_level", "replication_slot"}


def test_a_backup_taken_through_the_api_can_be_recovered_by_its_name(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    response = service.post(f"/servers/{server}/operations", json={
        "type": "backup", "name": "api-e2e", "immediate_checkpoint": True})
    assert response.status_code == 202, response.text
    busy = service.post(f"/servers/{server}/operations", json={"type": "backup"})
    assert busy.status_code == 409
    status = service.wait_until_ended(server, response.json()["operation_id"])
    assert status["status"] == "DONE", status.get("output")
    new_id = status["new_backup_id"]
    listed = {b["backup_id"]: b for b in service.get(f"/servers/{server}/backups").json()["backups"]}
    assert listed[new_id]["name"] == "api-e2e"

    destination = sandbox.restore_dir("e2e-named-backup")
    recovery = service.post(f"/servers/{server}/operations", json={
        "type": "recovery", "backup_id": "api-e2e", "destination_directory": destination,
        "remote_ssh_command": sandbox["SSH_COMMAND"]})
    assert recovery.status_code == 202, recovery.text
    done = service.wait_until_ended(server, recovery.json()["operation_id"])
    assert (done["status"], done["resolved_backup_id"]) == ("DONE", new_id), done.get("output")
    with sandbox.copy(destination) as port:
        assert sandbox.psql(port, "SELECT count(*) FROM known_rows WHERE id <= 100") == "100"


def test_config_switch_and_config_update_change_barmans_configuration(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    conf_dir = Path(sandbox["BARMAN_CONF"]).parent / "barman.d"
    barman = pwd.getpwnam(sandbox["BARMAN_USER"])
    model = conf_dir / "e2e-model.conf"
    model.write_text(f'[{server}-e2e-model]\ncluster = {server}\nmodel = true\ndescription = "from the model"\n')
    server_conf = conf_dir / f"{server}.conf"
    os.chown(server_conf, barman.pw_uid, barman.pw_gid)  # config-update rewrites the file holding the key
    try:
        switch = service.post(f"/servers/{server}/operations", json={
            "type": "config_switch", "model_name": f"{server}-e2e-model"})
        assert switch.status_code == 202, switch.text
        assert service.wait_until_ended(server, switch.json()["operation_id"])["status"] == "DONE"
        summary = next(s for s in service.get("/servers").json()["servers"] if s["name"] == server)
        assert summary["active_model"] == f"{server}-e2e-model"
        reset = service.post(f"/servers/{server}/operations", json={"type": "config_switch", "reset": True})
        assert service.wait_until_ended(server, reset.json()["operation_id"])["status"] == "DONE"

        update = service.post("/operations", json={"type": "config_update", "changes": [
            {"scope": "server", "server_name": server, "description": "changed through the API"}]})
        assert update.status_code == 202, update.text
        op_id = update.json()["operation_id"]
        deadline_status = None
        for _ in range(120):
            deadline_status = service.get(f"/operations/{op_id}").json()
            if deadline_status["status"] != "IN_PROGRESS":
                break
            __import__("time").sleep(0.5)
        assert deadline_status["status"] == "DONE", deadline_status.get("output")
        summary = next(s for s in service.get("/servers").json()["servers"] if s["name"] == server)
        assert summary["description"] == "changed through the API"
        refused = service.post("/operations", json={"type": "config_update", "changes": [
            {"scope": "server", "server_name": server, "post_backup_script": "touch /tmp/pwned"}]})
        assert refused.status_code == 400
    finally:
        model.unlink()
        os.chown(server_conf, 0, 0)


def test_concurrent_requests_for_one_backup_run_one_barman_show_backup(sandbox, service):
    """Each GET of a backup used to start its own `barman show-backup`: 80 at once slowed /status to
    seconds. Concurrent requests in one service process share one run (single flight)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    server, most, sampling = sandbox["BARMAN_SERVER"], [0], threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            most[0] = max(most[0], len(show_backup_processes(server)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: service.get(f"/servers/{server}/backups/{sandbox['BACKUP_ID']}"),
                                    range(40)))
    finally:
        sampling.set()
        sampler.join()
    assert [a.status_code for a in answers] == [200] * 40
    assert {a.json()["backup_id"] for a in answers} == {sandbox["BACKUP_ID"]}
    assert most[0] == 1


def show_backup_processes(server: str) -> list:
    """Pids of the `barman ... show-backup -- SERVER ...` processes running now."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"show-backup" in argv and server.encode() in argv and any(a.endswith(b"barman") for a in argv[:2]):
            found.append(int(pid))
    return found
