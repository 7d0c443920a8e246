"""Discovery when Barman's files or Barman itself fail: an unreadable backup.info is that backup's fault
alone, and `barman diagnose` answers with its document whenever it printed one."""

from __future__ import annotations

import json

import pytest

from tests.conftest import install_stand_in_barman

GOOD = "20261127T010000"
BAD = "20261128T010000"
RECOVERY = {"type": "recovery", "destination_directory": "/srv/pg/restore", "remote_ssh_command": "ssh postgres@db2"}


def meta_info(barman_files, backup_id, server="pg"):
    return barman_files.home / server / "meta" / f"{backup_id}-backup.info"


def break_meta_garbage(barman_files):
    barman_files.add_backup(BAD)
    meta_info(barman_files, BAD).write_bytes(b"\xff\xfe\x00 not a backup.info\n")
    return meta_info(barman_files, BAD)


def break_meta_bad_line(barman_files):
    barman_files.add_backup(BAD)
    meta_info(barman_files, BAD).write_text("this line has no equals sign\n")
    return meta_info(barman_files, BAD)


def break_meta_directory(barman_files):
    path = meta_info(barman_files, BAD)
    path.mkdir(parents=True)  # unreadable as a file even for root, as mode 000 is for the barman user
    return path


def break_legacy(barman_files):
    # Barman before 3.13.2 kept backup.info beside the base backup; Barman still reads it there.
    path = barman_files.home / "pg" / "base" / BAD / "backup.info"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x80\x81 garbage")
    return path


BREAKS = [break_meta_garbage, break_meta_bad_line, break_meta_directory, break_legacy]


@pytest.fixture(params=BREAKS, ids=[b.__name__ for b in BREAKS])
def corrupt(request, barman_files):
    barman_files.add_backup(GOOD)
    barman_files.add_server("other")
    barman_files.add_backup(GOOD, server="other")
    return request.param(barman_files)


def test_an_unreadable_backup_info_lists_that_backup_corrupt_and_the_others_as_they_are(client, corrupt):
    response = client.get("/servers/pg/backups")
    assert response.status_code == 200, response.json
    listed = {b["backup_id"]: b for b in response.json["backups"]}
    assert listed[GOOD]["status"] == "DONE"
    assert listed[BAD]["status"] == "CORRUPT"
    assert listed[BAD]["corrupt_file"] == str(corrupt)
    assert listed[BAD]["reason"]
    assert [b["backup_id"] for b in response.json["backups"]] == [GOOD, BAD]


def test_the_page_and_the_server_list_survive_an_unreadable_backup_info(client, corrupt):
    assert client.get("/servers").status_code == 200
    servers = client.get("/ui/view")
    assert servers.status_code == 200, servers.data
    page = client.get("/ui/view?server=pg")
    assert page.status_code == 200, page.data
    assert "CORRUPT" in page.data.decode()


def test_a_recovery_of_an_unreadable_backup_is_422_naming_the_file(client, corrupt, spawned):
    response = client.post("/servers/pg/operations", json={**RECOVERY, "backup_id": BAD})
    assert response.status_code == 422, response.json
    assert f"backup '{BAD}' of server 'pg' is corrupt" in response.json["error"]
    assert str(corrupt) in response.json["error"]
    assert spawned.calls == []


def test_a_recovery_of_another_backup_of_that_server_is_422_naming_the_file_barman_would_fail_on(client, corrupt,
                                                                                                 spawned):
    for backup_id in (GOOD, "latest"):
        response = client.post("/servers/pg/operations", json={**RECOVERY, "backup_id": backup_id})
        assert response.status_code == 422, response.json
        assert str(corrupt) in response.json["error"]
        assert "every barman restore" in response.json["error"]
    shown = client.get(f"/servers/pg/backups/{GOOD}")
    assert shown.status_code == 422 and str(corrupt) in shown.json["error"]
    assert spawned.calls == []


def test_other_servers_are_unaffected_by_an_unreadable_backup_info(client, corrupt, spawned):
    assert [b["status"] for b in client.get("/servers/other/backups").json["backups"]] == ["DONE"]
    response = client.post("/servers/other/operations", json={**RECOVERY, "backup_id": "latest"})
    assert response.status_code == 202, response.json


def test_metrics_keep_a_server_with_an_unreadable_backup_info(client, corrupt):
    text = client.get("/metrics").data.decode()
    assert 'barman_backups_total{server="pg"} 1.0' in text
    assert 'pgba_backups_corrupt{server="pg"} 1.0' in text
    assert 'pgba_backups_corrupt{server="other"} 0.0' in text


# -- GET /diagnose ----------------------------------------------------------------------------------

DOCUMENT = {"global": {"config": {}}, "servers": {"pg": {"status": {"connection_error": "connection refused"}}},
            "models": {}}


def stand_in(tmp_path, monkeypatch, barman_files, stdout: str, stderr: str, code: int):
    script = (f"#!/bin/sh\ncat <<'EOF'\n{stdout}\nEOF\ncat >&2 <<'EOF'\n{stderr}\nEOF\nexit {code}\n")
    install_stand_in_barman(tmp_path, monkeypatch, barman_files, script)


@pytest.mark.parametrize("stdout, stderr, code", [
    (json.dumps(DOCUMENT, indent=4), "ERROR: connection to server failed: Connection refused", 1),
    ("WARNING: a line Barman printed first\n" + json.dumps(DOCUMENT, indent=4), "", 0),
    (json.dumps(DOCUMENT, indent=4) + "\nand a line after it", "EXCEPTION: late failure", 1),
])
def test_diagnose_answers_barmans_document_whenever_barman_printed_one(client, barman_files, tmp_path, monkeypatch,
                                                                      stdout, stderr, code):
    stand_in(tmp_path, monkeypatch, barman_files, stdout, stderr, code)
    response = client.get("/diagnose")
    assert response.status_code == 200, response.json
    assert response.json == DOCUMENT


def test_diagnose_without_a_document_is_503_naming_barmans_failure(client, barman_files, tmp_path, monkeypatch):
    stand_in(tmp_path, monkeypatch, barman_files, "", "EXCEPTION: 'utf-8' codec can't decode byte 0xff\n"
             "See log file for more details.", 1)
    response = client.get("/diagnose")
    assert response.status_code == 503, response.json
    assert "exit code 1" in response.json["error"]
    assert "'utf-8' codec can't decode byte 0xff" in response.json["error"]
