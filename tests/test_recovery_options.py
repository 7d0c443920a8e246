"""Point-in-time recovery and restore options: validated at POST time, passed to barman as argv."""

import json

import pytest

from pg_backup_api.barman_io import commands as barman_cli

BODY = {"type": "recovery", "backup_id": "latest", "destination_directory": "/srv/pg/restore",
        "remote_ssh_command": "ssh postgres@db2"}


@pytest.fixture(autouse=True)
def backups(barman_files):
    barman_files.add_backup("20261127T010000")  # ends 2026-11-27 01:00:02+00:00
    meta = barman_files.home / "pg" / "meta"
    (meta / "20261127T030000-backup.info").write_text(
        "backup_id=20261127T030000\nstatus=DONE\nbegin_time=2026-11-27 03:00:00.000000+00:00\n"
        "end_time=2026-11-27 03:00:05.000000+00:00\n"
        "tablespaces=[('tbs1', 16385, '/srv/tbs1')]\n")


def post(client, **fields):
    return client.post("/servers/pg/operations", json={**BODY, **fields})


def job_of(barman_files, response):
    op_id = response.json["operation_id"]
    return json.loads((barman_files.home / "pg" / "jobs" / f"{op_id}.json").read_text())


@pytest.mark.parametrize("fields", [
    {"target_time": "2026-11-27T04:00:00+00:00", "target_action": "promote"},
    {"target_time": "2026-11-27 04:00:00.123Z", "exclusive": True},
    {"target_xid": "1234", "target_action": "pause"},
    {"target_lsn": "0/3000060", "target_tli": "latest"},
    {"target_name": "before_upgrade", "target_action": "shutdown"},
    {"target_immediate": True, "target_tli": 1},
    {"standby_mode": True, "get_wal": False, "bwlimit": 0, "jobs": 4, "network_compression": True},
    {"tablespaces": {"tbs1": "/srv/pg/tbs1"}, "staging_wal_directory": "/srv/pg/wal_staging"},
])
def test_valid_options_are_accepted_and_stored(client, barman_files, fields):
    response = post(client, **fields)
    assert response.status_code == 202, response.json
    job = job_of(barman_files, response)
    assert {k: job[k] for k in fields} == fields


@pytest.mark.parametrize("fields, field", [
    ({"target_time": "2026-11-27 04:00:00"}, "target_time"),
    ({"target_time": "yesterday"}, "target_time"),
    ({"target_time": "2026-13-45T04:00:00+00:00"}, "target_time"),
    ({"target_time": "2026-11-27T04:00:00+00:00'; DROP"}, "target_time"),
    ({"target_xid": "12a"}, "target_xid"),
    ({"target_xid": 12}, "target_xid"),
    ({"target_lsn": "0-3000060"}, "target_lsn"),
    ({"target_name": "x'; COPY"}, "target_name"),
    ({"target_immediate": "yes"}, "target_immediate"),
    ({"target_tli": 0}, "target_tli"),
    ({"target_tli": "newest"}, "target_tli"),
    ({"target_action": "reboot", "target_immediate": True}, "target_action"),
    ({"bwlimit": -1}, "bwlimit"),
    ({"jobs": 33}, "jobs"),
    ({"jobs": 0}, "jobs"),
    ({"tablespaces": {"tbs1": "relative"}}, "tablespaces"),
    ({"tablespaces": {"bad name": "/srv/x"}}, "tablespaces"),
    ({"staging_wal_directory": "/srv/a/../b"}, "staging_wal_directory"),
    ({"staging_wal_directory": "/root/.ssh"}, "staging_wal_directory"),
    ({"tablespaces": {"tbs1": "/etc/ssh"}}, "tablespaces.tbs1"),
    ({"tablespaces": {"tbs1": "/srv/pg/restore"}}, "tablespaces.tbs1"),
    ({"target_xid": "1", "target_name": "n"}, "target_xid, target_name"),
    ({"target_action": "promote"}, "target_action"),
    ({"exclusive": True, "target_name": "n"}, "exclusive"),
    ({"backup_id": "auto", "target_xid": "5"}, "backup_id"),
])
def test_invalid_options_are_a_400_naming_the_field(client, fields, field):
    response = post(client, **fields)
    assert response.status_code == 400
    assert field in response.json["error"]


def test_a_target_before_the_backup_end_is_refused_with_both_times(client):
    response = post(client, backup_id="20261127T030000", target_time="2026-11-27T02:00:00+00:00")
    assert response.status_code == 422
    assert "before the end of backup 20261127T030000" in response.json["error"]


def test_tablespace_names_must_exist_in_the_backup(client):
    response = post(client, tablespaces={"nope": "/srv/x"})
    assert response.status_code == 400
    assert "nope not in backup 20261127T030000 (it has: tbs1)" in response.json["error"]


def test_auto_picks_the_latest_backup_that_ends_before_the_target(client, barman_files):
    early = post(client, backup_id="auto", target_time="2026-11-27T02:00:00+00:00")
    assert job_of(barman_files, early)["resolved_backup_id"] == "20261127T010000"
    late = post(client, backup_id="auto", target_time="2026-11-27T05:00:00+00:00",
                destination_directory="/srv/pg/other")
    assert job_of(barman_files, late)["resolved_backup_id"] == "20261127T030000"
    none = post(client, backup_id="auto", target_time="2026-11-26T00:00:00+00:00",
                destination_directory="/srv/pg/third")
    assert none.status_code == 404


def test_argv_carries_each_option_as_one_flag_and_positionals_after_a_double_dash():
    argv = barman_cli.restore_argv("/etc/barman.conf", "pg", "20261127T030000", "/srv/pg/r", "ssh pg@db2", {
        "target_time": "2026-11-27T04:00:00+00:00", "target_action": "promote", "exclusive": True,
        "get_wal": False, "network_compression": True, "jobs": 4, "bwlimit": 0, "target_tli": "latest",
        "tablespaces": {"tbs2": "/srv/b", "tbs1": "/srv/a"}, "staging_wal_directory": "/srv/w"})
    assert argv[3:] == [
        barman_cli.RESTORE_COMMAND, "--remote-ssh-command=ssh pg@db2",
        "--target-time=2026-11-27T04:00:00+00:00", "--target-tli=latest", "--target-action=promote",
        "--bwlimit=0", "--jobs=4", "--staging-wal-directory=/srv/w",
        "--exclusive", "--no-get-wal", "--network-compression",
        "--tablespace=tbs1:/srv/a", "--tablespace=tbs2:/srv/b",
        "--", "pg", "20261127T030000", "/srv/pg/r"]
