"""The target probe: its script on real directory trees (dash and bash), its answer's parser, its ssh
command line, its failures, and the worker's last look at the staging directory."""

from __future__ import annotations

import errno
import json
import os
import posixpath
import shlex
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg_backup_api import create_app
from pg_backup_api.core.errors import ApiError, Unprocessable
from pg_backup_api.rules import effects
from pg_backup_api.rules.settings import Settings
from pg_backup_api.worker import target_probe

from .conftest import install_stand_in_barman, operation_ended

SHELLS = [sh for sh in ("dash", "bash") if shutil.which(sh)]
# The real one: every unit test's target_probe.probe is the conftest's FakeTarget.
probe = target_probe.probe


def run_script(paths: List[str], shell: str = "sh", user: str = "") -> Dict[str, effects.OnTarget]:
    """The probe's script run on this machine, as the target host would run it."""
    argv = [shell, "-s", "--", *paths]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    done = subprocess.run(argv, input=target_probe.SCRIPT.encode(), capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return target_probe.parse(done.stdout, paths)


def test_the_script_says_what_is_at_each_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / ".hidden").write_text("")
    (tmp_path / "newline").mkdir()
    (tmp_path / "newline" / "\n").write_text("")  # a name the listing must not lose
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "to-empty").symlink_to(tmp_path / "empty")
    names = ["empty", "full", "newline", "file", "dangling", "to-empty", "absent", "absent/below"]
    for shell in SHELLS:
        seen = run_script([str(tmp_path / n) for n in names], shell)
        assert [seen[str(tmp_path / n)].kind for n in names] == [
            "empty", "filled", "filled", "other", "other", "empty", "absent", "absent"], shell


def test_a_directory_the_ssh_user_cannot_list_is_unreadable():
    with tempfile.TemporaryDirectory() as top:  # not below pytest's own 0700 directory
        os.chmod(top, 0o755)
        locked = Path(top) / "locked"
        locked.mkdir(mode=0o711)
        (locked / "data").write_text("")
        if os.geteuid() == 0:  # root lists everything: ask as nobody, as an ssh user without the right would
            seen = run_script([str(locked)], user="65534")
        else:
            locked.chmod(0o311)
            seen = run_script([str(locked)])
        assert seen[str(locked)].kind == "unreadable"


def test_the_script_follows_links_as_far_as_the_path_exists(tmp_path):
    real = tmp_path.resolve()
    (tmp_path / "allowed").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "allowed" / "out").symlink_to("../outside")
    (tmp_path / "allowed" / "etc").symlink_to("/etc")
    (tmp_path / "allowed" / "dangling").symlink_to(tmp_path / "gone" / "deeper")
    (tmp_path / "loop").symlink_to("loop")
    cases = {
        "allowed/out/restore": f"{real}/outside/restore",
        "allowed/etc/restore/pg": "/etc/restore/pg",
        "allowed/dangling": f"{real}/gone/deeper",
        "allowed/dangling/wal": f"{real}/gone/deeper/wal",
        "allowed/new/dir": f"{real}/allowed/new/dir",
        "loop/x": None,
    }
    for shell in SHELLS:
        seen = run_script([str(tmp_path / p) for p in cases], shell)
        assert {p: seen[str(tmp_path / p)].real for p in cases} == cases, shell


def loops(path: str) -> bool:
    """The kernel meets a loop of symbolic links on the way to *path* or one of its parents."""
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        try:
            os.stat("/".join(parts[:i]))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return True
    return False


def through_a_link(path: str) -> bool:
    """*path* or one of its parents is a symbolic link."""
    parts = path.split("/")
    return any(os.path.islink("/".join(parts[:i])) for i in range(2, len(parts) + 1))


# Trees of directories, files and links (relative or absolute, to anything in the tree, '..' included).
NAMES = st.sampled_from(["a", "b", "c", "d"])
REL = st.lists(st.sampled_from(["a", "b", "c", "..", "."]), min_size=1, max_size=4).map("/".join)
ENTRY = st.tuples(st.lists(NAMES, min_size=1, max_size=3).map("/".join),
                  st.one_of(st.just("dir"), st.just("file"), st.tuples(st.just("link"), st.booleans(), REL)))


@pytest.mark.parametrize("shell", SHELLS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.lists(ENTRY, max_size=8), asked=st.lists(st.lists(NAMES, min_size=1, max_size=4).map("/".join),
                                                        min_size=1, max_size=4))
def test_the_scripts_real_path_is_pythons_realpath(shell, tree, asked):
    with tempfile.TemporaryDirectory() as top:
        root = Path(top).resolve()
        for name, what in tree:
            path = root / name
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if what == "dir":
                    path.mkdir()
                elif what == "file":
                    path.write_text("")
                else:
                    _, absolute, target = what
                    path.symlink_to(f"{root}/{target}" if absolute else target)
            except OSError:
                continue  # a name already taken, or a parent that is a file or a link: the tree is what it is
        paths = [str(root / p) for p in asked]
        seen = run_script(paths, shell)
        for path in paths:
            expected = os.path.realpath(path)
            if seen[path].real is None:
                # A loop: the kernel says so (ELOOP), or Python gave up, leaving a link in what it returns.
                assert loops(path) or through_a_link(expected), (path, tree)
            else:
                assert seen[path].real == expected, (path, tree)


# -- the answer's parser ---------------------------------------------------------------------------

PATH = st.lists(st.text(st.sampled_from("abc._-"), min_size=1, max_size=5), min_size=1, max_size=4).map(
    lambda parts: "/" + "/".join(parts))
ANSWER = st.tuples(st.sampled_from(effects.KINDS), st.one_of(st.none(), PATH))


@given(answers=st.dictionaries(PATH, ANSWER, min_size=1, max_size=5), noise=st.binary(max_size=40))
def test_an_answer_reads_back_as_the_script_wrote_it(answers, noise):
    encoded = noise.replace(target_probe.MARK, b"") + target_probe.MARK + b"".join(
        kind.encode() + b"\0" + (real.encode() + b"x" if real is not None else b"") + b"\0"
        for kind, real in answers.values())
    assert target_probe.parse(encoded, list(answers)) == {  # '.' and '..' of what does not exist go textually
        path: effects.OnTarget(kind, real and posixpath.normpath(real)) for path, (kind, real) in answers.items()}


@given(answer=st.binary(max_size=200), paths=st.lists(PATH, min_size=1, max_size=3, unique=True))
def test_any_answer_is_read_or_refused_with_a_422(answer, paths):
    try:
        seen = target_probe.parse(answer, paths)
    except Unprocessable as exc:
        assert exc.message.startswith("field 'remote_ssh_command': cannot look at the recovery's paths")
    else:
        assert set(seen) == set(paths)
        assert all(s.real is None or s.real.startswith("/") for s in seen.values())


@given(paths=st.lists(PATH, min_size=1, max_size=4))
def test_the_paths_reach_the_remote_shell_as_arguments_and_ssh_never_waits(paths):
    argv = target_probe.probe_argv(["ssh", "-p", "2222", "-o", "ConnectTimeout=3600", "postgres@db2"], paths)
    # First, so they win over the client's own values.
    assert argv[:5] == ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={target_probe.CONNECT_TIMEOUT}"]
    assert argv[5:-1] == ["-p", "2222", "-o", "ConnectTimeout=3600", "postgres@db2"]
    assert shlex.split(argv[-1]) == ["sh", "-s", "--", *paths]


# -- the probe over a command ------------------------------------------------------------------------

def stand_in_ssh(directory: Path) -> Path:
    """An `ssh` that runs the probe's remote command on this machine and is the real ssh otherwise."""
    directory.mkdir(exist_ok=True)
    exe = directory / "ssh"
    exe.write_text(textwrap.dedent("""\
        #!/bin/sh
        for last; do :; done
        case $last in "sh -s -- "*) exec sh -c "$last" ;; esac
        exec /usr/bin/ssh "$@"
        """))
    exe.chmod(0o755)
    return exe


def test_the_probe_runs_the_script_over_the_command(tmp_path):
    ssh = stand_in_ssh(tmp_path / "bin")
    (tmp_path / "wal").mkdir()
    (tmp_path / "wal" / "00000001").write_text("")
    seen = probe([str(ssh), "postgres@db2"], [str(tmp_path / "wal"), str(tmp_path / "restore")])
    assert seen == {str(tmp_path / "wal"): effects.OnTarget("filled", str(tmp_path.resolve() / "wal")),
                    str(tmp_path / "restore"): effects.OnTarget("absent", str(tmp_path.resolve() / "restore"))}


def test_a_host_ssh_cannot_reach_is_a_422_naming_ssh_s_failure():
    with pytest.raises(Unprocessable) as refused:
        probe(["ssh", "-p", "1", "postgres@127.0.0.1"], ["/srv/pg/restore"])
    assert refused.value.message.startswith("field 'remote_ssh_command': cannot look at the recovery's paths on "
                                            "the target host postgres@127.0.0.1: ssh exited with code 255: ")
    assert "Connection refused" in refused.value.message
    assert "\n" not in refused.value.message


def test_a_connection_sshd_drops_in_a_burst_is_retried(tmp_path, monkeypatch):
    # sshd beyond MaxStartups closes the connection during the key exchange: retried, as the ssh master is.
    tries = tmp_path / "tries"
    flaky = tmp_path / "ssh"
    flaky.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo x >> {tries}
        if [ "$(wc -l < {tries})" -lt 3 ]; then
            echo "kex_exchange_identification: Connection closed by remote host" >&2
            exit 255
        fi
        for last; do :; done
        exec sh -c "$last"
        """))
    flaky.chmod(0o755)
    monkeypatch.setattr(target_probe.ssh_master, "RETRY_DELAYS", (0.01, 0.01, 0.01))
    seen = probe([str(flaky), "db2"], [str(tmp_path / "restore")])
    assert seen[str(tmp_path / "restore")].kind == "absent"
    assert len(tries.read_text().splitlines()) == 3


def test_a_refused_connection_is_not_retried(tmp_path):
    tries = tmp_path / "tries"
    refused = tmp_path / "ssh"
    refused.write_text(f"#!/bin/sh\necho x >> {tries}\necho 'Permission denied (publickey).' >&2\nexit 255\n")
    refused.chmod(0o755)
    with pytest.raises(Unprocessable, match=r"ssh exited with code 255: Permission denied \(publickey\)\.$"):
        probe([str(refused), "db2"], ["/srv/x"])
    assert len(tries.read_text().splitlines()) == 1


def test_a_probe_that_does_not_answer_in_time_is_a_422(tmp_path, monkeypatch):
    silent = tmp_path / "ssh"
    silent.write_text("#!/bin/sh\nexec sleep 30\n")
    silent.chmod(0o755)
    monkeypatch.setattr(target_probe, "TIMEOUT", 0.5)
    with pytest.raises(Unprocessable, match="no answer within 0.5 s"):
        probe([str(silent), "db2"], ["/srv/pg/restore"])


def test_a_target_without_the_script_s_answer_is_a_422(tmp_path):
    chatty = tmp_path / "ssh"
    chatty.write_text("#!/bin/sh\necho 'Welcome to db2'\n")
    chatty.chmod(0o755)
    with pytest.raises(Unprocessable, match="does not come from the check"):
        probe([str(chatty), "db2"], ["/srv/pg/restore"])


# -- the worker's last look, just before barman ------------------------------------------------------

def test_recheck_staging_asks_only_about_an_explicit_staging_directory():
    asked = []

    def ask(argv, paths):
        asked.append((list(argv), list(paths)))
        return {paths[0]: effects.OnTarget("filled", paths[0])}

    job = {"remote_ssh_command": "ssh -o ControlMaster=no -o ControlPath=/h/.ssh-mux/x postgres@db2",
           "destination_directory": "/srv/pg/restore", "target_name": "n"}
    assert target_probe.recheck_staging(job, ask) is None and asked == []
    refusal = target_probe.recheck_staging({**job, "staging_wal_directory": "/srv/pg/wal"}, ask)
    assert asked == [(job["remote_ssh_command"].split(), ["/srv/pg/wal"])]
    assert refusal.startswith("field 'staging_wal_directory': /srv/pg/wal is a directory that holds files on the "
                              "target host; PostgreSQL would delete it")


def test_recheck_staging_fails_closed_when_the_target_cannot_be_asked():
    def unreachable(argv, paths):
        raise Unprocessable("field 'remote_ssh_command': cannot look ...: ssh exited with code 255")

    refusal = target_probe.recheck_staging({"remote_ssh_command": "ssh db2", "staging_wal_directory": "/srv/w"},
                                           unreachable)
    assert refusal.startswith("cannot check staging_wal_directory /srv/w on the target host: ")


BARMAN_RUNS = textwrap.dedent("""\
    #!/bin/sh
    echo "$@" >> "$FAKE_BARMAN_STARTS"
    echo "Restore operation completed"
    """)


@pytest.mark.parametrize("filled", [True, False])
def test_a_staging_directory_filled_before_barman_starts_fails_the_recovery_and_barman_never_runs(
        tmp_path, monkeypatch, barman_files, filled):
    # The service accepted it (its FakeTarget saw nothing there); the detached worker then asks the
    # "target" over ssh, a stand-in running the probe's script on this machine.
    install_stand_in_barman(tmp_path, monkeypatch, barman_files, BARMAN_RUNS, "[api]\nssh_multiplex = off\n")
    stand_in_ssh(tmp_path / "ssh-bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'ssh-bin'}:{os.environ['PATH']}")
    starts = tmp_path / "barman-starts"
    monkeypatch.setenv("FAKE_BARMAN_STARTS", str(starts))
    staging = tmp_path / "wal"
    staging.mkdir()
    if filled:
        (staging / "base.conf").write_text("someone's data")
    client = create_app(Settings(barman_conf=str(barman_files.conf))).test_client()
    response = client.post("/servers/pg/operations", json={
        "type": "recovery", "backup_id": "latest", "destination_directory": "/srv/pg/restore",
        "remote_ssh_command": "ssh postgres@db2", "target_name": "n", "staging_wal_directory": str(staging)})
    assert response.status_code == 202, response.json
    doc = operation_ended(client, response.json["operation_id"], timeout=30)
    if filled:
        assert (doc["status"], doc["state"]) == ("FAILED", "failed")
        assert doc["reason"].startswith(f"field 'staging_wal_directory': {staging} is a directory that holds files "
                                        "on the target host; PostgreSQL would delete it")
        assert "pg-backup-api: barman not started: " in doc["output"]
        assert not starts.exists()
        assert (staging / "base.conf").read_text() == "someone's data"
    else:
        assert doc["status"] == "DONE", doc
        assert len(starts.read_text().splitlines()) == 1


def test_the_job_records_where_the_destination_really_leads(client, barman_files, fake_target):
    barman_files.add_backup("20261127T010000")
    fake_target.paths["/srv/pg/link"] = effects.OnTarget("absent", "/srv/data/restore")
    response = client.post("/servers/pg/operations", json={
        "type": "recovery", "backup_id": "latest", "destination_directory": "/srv/pg/link",
        "remote_ssh_command": "ssh postgres@db2"})
    assert response.status_code == 202, response.json
    job = json.loads((barman_files.home / "pg" / "jobs" / f"{response.json['operation_id']}.json").read_text())
    assert (job["destination_directory"], job["resolved_destination_directory"]) == ("/srv/pg/link",
                                                                                      "/srv/data/restore")
    assert fake_target.calls == [(("ssh", "postgres@db2"), ("/srv/pg/link",))]


def test_an_ssh_that_cannot_be_run_is_a_422():
    with pytest.raises(ApiError) as refused:
        probe(["/nonexistent/ssh", "db2"], ["/srv/x"])
    assert refused.value.status == 422
    assert "cannot run /nonexistent/ssh" in refused.value.message
