"""ssh multiplexing: what the worker adds to the ssh command, where the socket lives, how it falls back."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from pg_backup_api.core.errors import InvalidRequest
from pg_backup_api.core.model import OperationType
from pg_backup_api.rules import ssh_command
from pg_backup_api.rules.settings import Settings
from pg_backup_api.worker import runner, ssh_master

from .conftest import BarmanFiles

CLIENT = "ssh -p 2222 -o ConnectTimeout=5 postgres@db2.example.org"
# Nothing listens on port 1: a master to it exits at once ("Connection refused").
REFUSED = "ssh -p 1 -o ConnectTimeout=5 postgres@127.0.0.1"
ON, OFF = Settings(), Settings(ssh_multiplex=False)
# What the worker puts first in every ssh command by default (ssh_connect_timeout, the keepalives).
BOUNDS = "-o ConnectTimeout=10 -o ServerAliveInterval=15 -o ServerAliveCountMax=4"


def with_bounds(command: str) -> str:
    return command.replace("ssh ", f"ssh {BOUNDS} ", 1)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    """A refused connection is retried: quickly here."""
    monkeypatch.setattr(ssh_master, "RETRY_DELAYS", (0.01, 0.02))


@pytest.fixture
def short_tmp():
    """A folder with a short path: pytest's own are too long for a unix socket under them."""
    path = Path(tempfile.mkdtemp(prefix="pgba-mux-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def barman_files(short_tmp):
    return BarmanFiles(short_tmp)


def parsed(command: str = CLIENT) -> ssh_command.SshCommand:
    return ssh_command.parse(command)


def test_barman_gets_the_clients_command_with_the_mux_options_first():
    sock = Path("/var/lib/barman/.ssh-mux/20261127T093201.abc123")
    command = ssh_master.mux_command(parsed(), sock)
    assert command == ("ssh -o ControlMaster=no -o ControlPath=/var/lib/barman/.ssh-mux/20261127T093201.abc123 "
                       "-p 2222 -o ConnectTimeout=5 postgres@db2.example.org")
    # /bin/sh splits it exactly where Python does: no quoting or expansion is involved.
    assert shlex.split(command) == command.split()
    assert command.split()[-1] == "postgres@db2.example.org"


def test_the_master_is_the_clients_command_as_a_foreground_master():
    sock = Path("/h/.ssh-mux/x")
    argv = ssh_master.master_argv(parsed(), sock)
    assert argv[:10] == ["ssh", "-M", "-N", "-o", "ControlPath=/h/.ssh-mux/x", "-o", "ControlPersist=no",
                         "-o", "BatchMode=yes", "-p"]
    assert argv[-1] == "postgres@db2.example.org"


def test_the_probe_cannot_fall_back_to_a_direct_connection():
    argv = ssh_master.probe_argv(parsed(), Path("/h/.ssh-mux/x"))
    assert "ProxyCommand=false" in argv and argv[-2:] == ["postgres@db2.example.org", "true"]


@pytest.mark.parametrize("option", ["ControlMaster=no", "ControlPath=/tmp/x", "ControlPersist=yes"])
def test_clients_still_cannot_name_the_mux_options(option):
    with pytest.raises(InvalidRequest, match="never allowed"):
        ssh_command.parse(f"ssh -o {option} host", ssh_command.ENABLEABLE)
    with pytest.raises(ValueError, match="can never be enabled"):
        ssh_command.option_names(option.split("=")[0], "[api]")


def test_one_socket_per_operation_and_server_short_enough_for_a_unix_socket():
    home = Path("/var/lib/barman")
    a = ssh_master.socket_path(home, "pg", "20261127T093201-2")
    assert a.parent == home / ".ssh-mux"
    assert a != ssh_master.socket_path(home, "other", "20261127T093201-2")
    assert a != ssh_master.socket_path(home, "pg", "20261127T093201")
    assert len(str(a)) <= ssh_master.MAX_SOCKET_PATH
    assert ssh_master.SAFE_PATH.fullmatch(str(a))


def test_a_socket_path_too_long_or_unsafe_is_a_reason_not_a_master(tmp_path):
    long = ssh_master.Master(parsed(), tmp_path / ("d" * 100) / "s", dict(os.environ))
    assert "longer than 90 bytes" in long.start()
    odd = ssh_master.Master(parsed(), Path("/tmp/a b/s"), dict(os.environ))
    assert "characters other than" in odd.start()
    assert long.proc is None and odd.proc is None


def test_the_socket_directory_is_made_private(tmp_path):
    directory = tmp_path / ".ssh-mux"
    ssh_master.prepare_dir(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    directory.chmod(0o755)
    ssh_master.prepare_dir(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_socket_directory_that_is_a_file_or_a_link_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="not a directory"):
        ssh_master.prepare_dir(tmp_path / "file")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError, match="not a directory"):
        ssh_master.prepare_dir(tmp_path / "link")


# Skipped only off CI: there the tests run as root, and a missing root must fail the run, not hide it.
@pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI", "").lower() != "true",
                    reason="needs root to give the directory to another user")
def test_a_socket_directory_of_another_user_is_refused(tmp_path):
    directory = tmp_path / ".ssh-mux"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(OSError, match="belongs to uid 65534"):
        ssh_master.prepare_dir(directory)


def test_sweep_removes_sockets_nobody_listens_on_and_keeps_the_rest(tmp_path):
    directory = ssh_master.socket_dir(tmp_path)
    directory.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(directory / "stale"))
    stale.close()  # the file stays: what a master killed with SIGKILL leaves
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(directory / "live"))
    live.listen(1)
    (directory / "not-a-socket").write_text("")
    try:
        assert ssh_master.sweep(tmp_path) == ["stale"]
        assert sorted(p.name for p in directory.iterdir()) == ["live", "not-a-socket"]
    finally:
        live.close()
    assert ssh_master.sweep(tmp_path / "nowhere") == []


def test_an_operation_without_ssh_runs_unchanged_without_a_note(tmp_path):
    job = {"name": "nightly"}
    with ssh_master.multiplexed(OperationType.BACKUP, job, tmp_path, "pg", "20261127T093201", config=ON) as plan:
        assert plan.job is job and plan.note == ""
    assert not ssh_master.socket_dir(tmp_path).exists()


def test_with_multiplexing_off_barman_gets_the_clients_command_and_the_output_says_so(tmp_path):
    job = {"remote_ssh_command": CLIENT}
    with ssh_master.multiplexed(OperationType.RECOVERY, job, tmp_path, "pg", "20261127T093201", config=OFF) as plan:
        assert plan.job == {"remote_ssh_command": with_bounds(CLIENT)}
        assert plan.note.startswith("pg-backup-api: ssh multiplexing is off (ssh_multiplex = off)")
    assert not ssh_master.socket_dir(tmp_path).exists()


def test_a_master_that_cannot_connect_falls_back_to_the_plain_command_and_says_why(short_tmp):
    job = {"remote_ssh_command": REFUSED}
    with ssh_master.multiplexed(OperationType.RECOVERY, job, short_tmp, "pg", "20261127T093201", config=ON) as plan:
        assert plan.job == {"remote_ssh_command": with_bounds(REFUSED)}
        last = plan.note.splitlines()[-1]
        assert last.startswith("pg-backup-api: ssh not multiplexed (the master connection exited with code 255")
        assert "Connection refused" in last
        assert "barman runs remote_ssh_command as sent" in last
    assert list(ssh_master.socket_dir(short_tmp).iterdir()) == []


class ClosingServer:
    """A TCP listener on loopback that closes every connection at once, as sshd past MaxStartups does."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


def test_a_master_dropped_during_the_key_exchange_is_retried_then_falls_back(short_tmp, monkeypatch):
    monkeypatch.setattr(ssh_master, "RETRY_DELAYS", (0.01, 0.02))
    server = ClosingServer()
    job = {"remote_ssh_command": f"ssh -p {server.port} -o ConnectTimeout=5 postgres@127.0.0.1"}
    try:
        with ssh_master.multiplexed(OperationType.RECOVERY, job, short_tmp, "pg", "20261127T093201",
                                    config=ON) as plan:
            assert plan.job == {"remote_ssh_command": with_bounds(job["remote_ssh_command"])}
    finally:
        server.listener.close()
    assert server.accepted == 3
    lines = plan.note.splitlines()
    assert len(lines) == 3
    assert all(re.match(r"pg-backup-api: ssh master: the master connection exited with code 255: "
                        r"kex_exchange_identification: .* \(retried after \d+\.\d s\)$", line) for line in lines[:2])
    assert lines[2].startswith("pg-backup-api: ssh not multiplexed (the master connection exited with code 255")


def test_a_refused_connection_is_retried_a_bounded_number_of_times_and_the_output_says_so(short_tmp):
    with ssh_master.multiplexed(OperationType.RECOVERY, {"remote_ssh_command": REFUSED}, short_tmp, "pg",
                                "20261127T093201", config=ON) as plan:
        lines = plan.note.splitlines()
    assert len(lines) == 3  # two retries (RETRY_DELAYS), then the fallback
    assert all(re.match(r"pg-backup-api: ssh master: the master connection exited with code 255: "
                        r".*Connection refused \(retried after \d+\.\d s\)$", line) for line in lines[:2])
    assert lines[2].startswith("pg-backup-api: ssh not multiplexed (")


def test_an_unknown_host_is_not_retried(short_tmp):
    job = {"remote_ssh_command": "ssh -o ConnectTimeout=5 postgres@no-such-host.invalid"}
    with ssh_master.multiplexed(OperationType.RECOVERY, job, short_tmp, "pg", "20261127T093201", config=ON) as plan:
        assert "retried" not in plan.note
        assert plan.note.count("\n") == 1


def test_the_setting_is_on_by_default_and_takes_on_or_off(tmp_path):
    assert Settings.from_env({}).ssh_multiplex is True
    assert Settings.from_env({"PG_BACKUP_API_SSH_MULTIPLEX": "off"}).ssh_multiplex is False
    conf = tmp_path / "api.conf"
    conf.write_text("[api]\nssh_multiplex = no\n")
    assert Settings.from_env({"PG_BACKUP_API_CONFIG": str(conf)}).ssh_multiplex is False
    with pytest.raises(ValueError, match="ssh_multiplex must be on or off, not 'sometimes'"):
        Settings.from_env({"PG_BACKUP_API_SSH_MULTIPLEX": "sometimes"})


# -- the hook in the worker ---------------------------------------------------------------------

ECHO_BARMAN = """#!/bin/sh
for arg in "$@"; do echo "ARG $arg"; done
"""


@pytest.fixture
def recovery(client, barman_files, tmp_path, monkeypatch):
    """A stored recovery whose `barman` is a script printing its arguments; run in-process."""
    barman_files.add_backup("20261127T010000")
    script = tmp_path / "barman"
    script.write_text(ECHO_BARMAN)
    script.chmod(0o755)
    monkeypatch.setattr(runner.barman_cli, "barman_executable", lambda: str(script))
    monkeypatch.delenv("PG_BACKUP_API_SSH_MULTIPLEX", raising=False)
    body = {"type": "recovery", "backup_id": "latest", "destination_directory": "/srv/pg/restore",
            "remote_ssh_command": REFUSED}
    response = client.post("/servers/pg/operations", json=body)
    assert response.status_code == 202, response.json
    return response.json["operation_id"]


def run(barman_files, op_id, exit_status=0):
    assert runner.run_operation(OperationType.RECOVERY, str(barman_files.conf), "pg", op_id) == exit_status
    return json.loads((barman_files.home / "pg" / "output" / f"{op_id}.json").read_text())


def test_the_worker_hands_barman_the_rewritten_command_and_records_the_clients(
        recovery, barman_files, monkeypatch):
    monkeypatch.setattr(ssh_master.Master, "start", lambda self, timeout=0: None)  # as if it were up
    output = run(barman_files, recovery)
    sock = ssh_master.socket_path(barman_files.home, "pg", recovery)
    assert f"ARG --remote-ssh-command=ssh -o ControlMaster=no -o ControlPath={sock} {BOUNDS} -p 1" in output["output"]
    assert output["output"].startswith("pg-backup-api: ssh multiplexed: one master connection to 127.0.0.1")
    assert output["remote_ssh_command"] == REFUSED
    job = json.loads((barman_files.home / "pg" / "jobs" / f"{recovery}.json").read_text())
    assert job["remote_ssh_command"] == REFUSED


def test_the_worker_falls_back_when_the_master_fails(recovery, barman_files):
    output = run(barman_files, recovery)
    assert output["state"] == "succeeded"
    assert f"ARG --remote-ssh-command={with_bounds(REFUSED)}" in output["output"]
    assert "ssh not multiplexed (the master connection exited" in output["output"]


def test_the_worker_follows_the_setting(recovery, barman_files, monkeypatch):
    monkeypatch.setenv("PG_BACKUP_API_SSH_MULTIPLEX", "off")
    output = run(barman_files, recovery)
    assert f"ARG --remote-ssh-command={with_bounds(REFUSED)}" in output["output"]
    assert output["output"].startswith("pg-backup-api: ssh multiplexing is off")


def test_the_worker_is_recorded_and_the_path_shown_before_barman_starts(recovery, barman_files, monkeypatch):
    store = runner.OperationStore(barman_files.home / "pg", "pg")
    seen = {}

    def start(self, timeout=0):
        seen["worker"] = store.read_worker(recovery)  # a cancel now finds the group to stop
        return "stand-in reason"
    monkeypatch.setattr(ssh_master.Master, "start", start)
    with ssh_master.multiplexed(OperationType.RECOVERY, store.get(recovery).job, barman_files.home, "pg",
                                recovery, store) as plan:
        assert store.read_progress(recovery) == plan.note
    assert seen["worker"]["pid"] == os.getpid()
    assert "stand-in reason" in plan.note


def test_no_master_starts_once_a_cancel_is_requested(recovery, barman_files, monkeypatch):
    store = runner.OperationStore(barman_files.home / "pg", "pg")
    store.request_cancel(recovery, {"requested_at": "now"})
    monkeypatch.setattr(ssh_master.Master, "start", lambda self, timeout=0: pytest.fail("a master started"))
    output = run(barman_files, recovery, exit_status=1)
    assert output["state"] == "canceled"
    assert output["output"] == "pg-backup-api: barman not started: canceled before barman started\n"


# -- timeouts: a port that accepts TCP and never speaks ssh ----------------------------------------

class SilentServer:
    """A TCP listener on loopback that accepts every connection and never says a word."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.held = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self):
        self.listener.close()
        for conn in self.held:
            conn.close()


def test_a_silent_port_fails_the_master_within_ssh_connect_timeout_and_barman_gets_the_bound_too(short_tmp):
    server = SilentServer()
    job = {"remote_ssh_command": f"ssh -p {server.port} postgres@127.0.0.1"}
    config = Settings(ssh_connect_timeout=1)
    try:
        with ssh_master.multiplexed(OperationType.RECOVERY, job, short_tmp, "pg", "20261127T093201",
                                    config=config) as plan:
            assert "Connection timed out during banner exchange" in plan.note
            assert "Connection timed out during banner exchange" in plan.unreachable
            assert plan.job["remote_ssh_command"].startswith("ssh -o ConnectTimeout=1 -o ServerAliveInterval=15 ")
    finally:
        server.close()


def test_a_clients_own_timeouts_cannot_lift_the_services():
    command = ssh_command.parse("ssh -o ConnectTimeout=3600 -o ServerAliveInterval=0 -p 2222 postgres@db2")
    argv = ssh_master.bounded(command, ssh_master.timeout_options(Settings())).argv
    # What ssh itself makes of it: it keeps the first value of each option.
    resolved = dict(line.split(" ", 1) for line in subprocess.run(
        [argv[0], "-G", *argv[1:]], capture_output=True, text=True, check=True).stdout.splitlines())
    assert (resolved["connecttimeout"], resolved["serveraliveinterval"], resolved["serveralivecountmax"]) == (
        "10", "15", "4")


def test_the_ssh_timeouts_are_settings_and_zero_turns_them_off(tmp_path):
    conf = tmp_path / "api.conf"
    conf.write_text("[api]\nssh_connect_timeout = 0\nssh_server_alive_interval = 0\n")
    settings = Settings.from_env({"PG_BACKUP_API_CONFIG": str(conf)})
    assert ssh_master.timeout_options(settings) == []
    settings = Settings.from_env({"PG_BACKUP_API_SSH_CONNECT_TIMEOUT": "3",
                                  "PG_BACKUP_API_SSH_SERVER_ALIVE_COUNT_MAX": "2"})
    assert ssh_master.timeout_options(settings) == ["-o", "ConnectTimeout=3", "-o", "ServerAliveInterval=15",
                                                    "-o", "ServerAliveCountMax=2"]
    with pytest.raises(ValueError, match="ssh_server_alive_count_max must be an integer from 1 to 100"):
        Settings.from_env({"PG_BACKUP_API_SSH_SERVER_ALIVE_COUNT_MAX": "0"})


# -- a master lost while barman runs -----------------------------------------------------------------

def test_barman_restore_retries_a_copy_cut_off_with_its_connection(recovery, client, barman_files, monkeypatch):
    output = run(barman_files, recovery)["output"]
    assert "ARG --retry-times=2\nARG --retry-sleep=5\n" in output
    monkeypatch.setenv("PG_BACKUP_API_COPY_RETRY_TIMES", "0")  # the server's basebackup_retry_times then applies
    body = {"type": "recovery", "backup_id": "latest", "destination_directory": "/srv/pg/other",
            "remote_ssh_command": REFUSED}
    other = client.post("/servers/pg/operations", json=body).json["operation_id"]
    assert "--retry-times" not in run(barman_files, other)["output"]


def test_the_output_says_when_the_master_died_while_barman_ran():
    master = ssh_master.Master(parsed(), Path("/nonexistent/s"), dict(os.environ))
    master.proc = subprocess.Popen(["sleep", "60"])
    plan = ssh_master.Plan({}, "", (2, 5), master)
    assert plan.afterwards() == ""  # alive: nothing to say
    master.proc.kill()
    master.proc.wait()
    assert plan.afterwards() == ("pg-backup-api: the ssh master connection was killed by SIGKILL while barman ran: "
                                 "barman's later ssh and rsync connected directly, and a copy cut off with it is "
                                 "retried (--retry-times=2)\n")
