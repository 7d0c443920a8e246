"""The Debian package on a clean Debian 12 root, not on the build machine.

packaging/build-deb builds the .deb here; a fresh bookworm root (tests/e2e/debian_root.py) gets
Debian's barman, postgresql-15, openssh-server and rsync with apt, then boots with systemd as PID 1.
Inside it: `apt install ./pg-backup-api_*.deb` beside Debian's barman, a Barman server for the
root's own PostgreSQL 15 cluster (streaming backup, `barman backup --wait`), `systemctl enable --now
pg-backup-api`, a recovery through the API over ssh to postgres@localhost, the restored cluster
started and its rows read back; then `apt-get remove` and `purge` leave Barman, /etc/barman.conf and
Barman's home as they were.
"""

from __future__ import annotations

import difflib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from .conftest import ROOT, wait_for
from .debian_root import Root, fresh_root, need_tools

pytestmark = pytest.mark.e2e

SERVER = "pg"
ROWS_QUERY = "SELECT count(*), md5(string_agg(label, ',' ORDER BY id)) FROM known_rows"
DESTINATION = "/var/lib/postgresql/15/restored"  # a directory of its own: not a child of /var/lib/postgresql
BARMAN_SERVER_CONF = f"""[{SERVER}]
description = the root's own PostgreSQL 15 cluster
conninfo = host=/var/run/postgresql user=barman dbname=postgres
streaming_conninfo = host=/var/run/postgresql user=barman
backup_method = postgres
streaming_archiver = on
slot_name = barman
create_slot = auto
"""
# What Barman owns: the package's scripts must leave every byte and mode of it alone.
BARMANS = ["/etc/barman.conf", "/etc/barman.d", "/var/lib/barman"]


def as_user(user: str, *argv: str) -> tuple:
    return ("runuser", "-u", user, "--", *argv)


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    need_tools()
    out = tmp_path_factory.mktemp("deb")
    built = subprocess.run([str(ROOT / "packaging" / "build-deb"), str(out)], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-5000:]
    deb = Path(built.stdout.strip().splitlines()[-1])
    assert deb.is_file() and deb.name.endswith("_all.deb"), built.stdout
    return deb


@pytest.fixture(scope="module")
def root(deb, tmp_path_factory) -> Iterator[Root]:
    """The booted root, with Debian's Barman stack installed and the package's dependencies
    downloaded (so that its own install, inside the booted system, needs no network)."""
    with fresh_root(tmp_path_factory.mktemp("debian-root"), "root") as box:
        box.check("apt-get", "update", "-q")
        with box.no_service_starts():
            box.check("apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd-sysv", "dbus",
                      "barman", "postgresql-15", "openssh-server", "openssh-client", "rsync")
            shutil.copy(deb, box.path / "root" / deb.name)
            box.check("apt-get", "install", "-y", "-q", "--download-only", "--no-install-recommends",
                      f"/root/{deb.name}")
        box.boot()
        yield box


@pytest.fixture(scope="module")
def installed(root, deb) -> Root:
    """`apt install ./pg-backup-api_*.deb` in the booted root."""
    # No network in the booted root: every dependency is in apt's cache already.
    root.check("apt-get", "install", "-y", "-q", "--no-install-recommends", f"/root/{deb.name}")
    return root


@pytest.fixture(scope="module")
def backed_up(installed) -> str:
    """A Barman server for the root's cluster with one streaming backup; the rows it holds."""
    box = installed
    psql = as_user("postgres", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At")
    box.check(*psql, "-c", "CREATE ROLE barman SUPERUSER LOGIN")
    box.check(*psql, "-c", "CREATE TABLE known_rows (id int PRIMARY KEY, label text NOT NULL)")
    box.check(*psql, "-c", "INSERT INTO known_rows SELECT i, 'row ' || i FROM generate_series(1, 100) i")
    rows = box.check(*psql, "-c", ROWS_QUERY).strip()
    box.write(f"/etc/barman.d/{SERVER}.conf", BARMAN_SERVER_CONF)
    barman = as_user("barman", "barman")
    box.check(*barman, "receive-wal", "--create-slot", SERVER)
    # Debian's barman has cron run `barman cron` each minute (it starts receive-wal and archives what
    # that received); the root has no cron, and every 2 s keeps the waits below short.
    box.check("systemd-run", "--unit=barman-cron", "--uid=barman", "--gid=barman",
              "sh", "-c", "while :; do barman -q cron; sleep 2; done")
    # A WAL switched before pg_receivewal streams would never reach Barman: wait for its first segment.
    streaming = box.path / "var/lib/barman" / SERVER / "streaming"
    wait_for(lambda: any(streaming.glob("*.partial")), timeout=120, what="barman receive-wal streams")
    box.check(*barman, "switch-wal", "--force", "--archive", "--archive-timeout", "60", SERVER, timeout=120)
    box.check(*barman, "check", SERVER)
    box.check(*barman, "backup", "--wait", SERVER, timeout=300)
    # The barman user's ssh key, authorised for postgres@localhost, the host key known.
    box.check(*as_user("barman", "mkdir", "-p", "-m", "700", "/var/lib/barman/.ssh"))
    box.check(*as_user("barman", "ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                       "-f", "/var/lib/barman/.ssh/id_ed25519"))
    key = (box.path / "var/lib/barman/.ssh/id_ed25519.pub").read_text()
    box.check(*as_user("postgres", "mkdir", "-p", "-m", "700", "/var/lib/postgresql/.ssh"))
    box.check(*as_user("postgres", "sh", "-c", f"echo '{key.strip()}' > /var/lib/postgresql/.ssh/authorized_keys"))
    known = box.check("ssh-keyscan", "-t", "ed25519", "localhost")
    box.check(*as_user("barman", "sh", "-c", f"echo '{known.strip()}' > /var/lib/barman/.ssh/known_hosts"))
    box.check(*as_user("barman", "ssh", "-o", "BatchMode=yes", "postgres@localhost", "true"))
    return rows


def wait_until_ended(box: Root, op_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body = box.http("GET", f"/servers/{SERVER}/operations/{op_id}")
        assert code == 200, body
        status = json.loads(body)
        if status["status"] != "IN_PROGRESS":
            return status
        time.sleep(1)
    raise AssertionError(f"operation {op_id} still IN_PROGRESS after {timeout} s")


def service_logs(box: Root) -> str:
    """The unit's journal and gunicorn's error log (where the application's own errors go)."""
    log = box.path / "var/log/barman/pg-backup-api.log"
    return "\n" + box.machine.journal()[-3000:] + "\n" + (log.read_text()[-5000:] if log.exists() else "")


def barmans_state(box: Root) -> str:
    """Every path, size, mode, owner and modification time of what Barman owns."""
    return box.check("find", *BARMANS, "-printf", "%p %s %m %u:%g %T@\n")


def differences(before: str, after: str) -> str:
    """The lines that differ between two listings; '' when they are the same."""
    return "\n".join(difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0))


def test_the_package_installs_beside_debians_barman_and_waits_to_be_enabled(installed):
    box = installed
    assert box.check("dpkg-query", "-W", "-f", "${Status}", "pg-backup-api") == "install ok installed"
    # Debian's barman, run by the same Python as the service: the workers run /usr/bin/barman.
    assert box.check("/usr/bin/barman", "--version").startswith("3.")
    unit = box.check("systemctl", "cat", "pg-backup-api.service")
    assert "ExecStart=/usr/bin/gunicorn -c /etc/pg-backup-api/gunicorn.conf.py pg_backup_api.app:application" in unit
    for conffile in ("/etc/pg-backup-api/gunicorn.conf.py", "/etc/default/pg-backup-api",
                     "/etc/logrotate.d/pg-backup-api"):
        assert (box.path / conffile.lstrip("/")).is_file(), conffile
    # Not enabled nor started on install: the operator configures it first (README, "Install").
    assert box.run("systemctl", "is-enabled", "pg-backup-api.service").stdout.strip() == "disabled"
    assert box.run("systemctl", "is-active", "pg-backup-api.service").stdout.strip() == "inactive"


def test_enable_now_serves_and_a_recovery_through_the_api_restores_the_rows(backed_up, installed):
    box = installed
    started = box.run("systemctl", "enable", "--now", "pg-backup-api.service")
    assert started.returncode == 0, started.stderr + service_logs(box)
    assert box.check("systemctl", "show", "-P", "User", "pg-backup-api.service").strip() == "barman"
    code, body = box.http("GET", "/status")
    assert (code, body.strip()) == (200, '"OK"'), body + service_logs(box)
    code, body = box.http("GET", "/servers")
    assert code == 200 and SERVER in body, body

    request = {"type": "recovery", "backup_id": "latest", "destination_directory": DESTINATION,
               "remote_ssh_command": "ssh postgres@localhost"}
    code, body = box.http("POST", f"/servers/{SERVER}/operations", json.dumps(request))
    assert code == 202, body
    status = wait_until_ended(box, json.loads(body)["operation_id"])
    assert status["status"] == "DONE", json.dumps(status, indent=1)[-4000:] + service_logs(box)

    # Barman restores PGDATA only: Debian keeps a cluster's configuration in /etc/postgresql.
    for name, text in (("postgresql.conf", "port = 5433\nlisten_addresses = ''\nunix_socket_directories = '/tmp'\n"),
                       ("pg_hba.conf", "local all all peer\n"), ("pg_ident.conf", "")):
        box.check(*as_user("postgres", "sh", "-c", f"printf '%s' \"{text}\" > {DESTINATION}/{name}"))
    box.check(*as_user("postgres", "/usr/lib/postgresql/15/bin/pg_ctl", "-D", DESTINATION, "-w", "-t", "120",
                       "-l", "/var/lib/postgresql/15/restored.log", "start"), timeout=180)
    try:
        restored = box.check(*as_user("postgres", "psql", "-X", "-At", "-h", "/tmp", "-p", "5433",
                                      "-c", ROWS_QUERY)).strip()
    finally:
        box.run(*as_user("postgres", "/usr/lib/postgresql/15/bin/pg_ctl", "-D", DESTINATION, "-w", "stop"))
    assert restored == backed_up and restored.startswith("100|")


def test_an_upgrade_restarts_the_enabled_service(installed, deb):
    box = installed
    before = box.check("systemctl", "show", "-P", "MainPID", "pg-backup-api.service").strip()
    assert box.check("systemctl", "is-enabled", "pg-backup-api.service").strip() == "enabled"
    box.check("apt-get", "install", "-y", "-q", "--reinstall", f"/root/{deb.name}")
    assert box.check("systemctl", "show", "-P", "MainPID", "pg-backup-api.service").strip() not in (before, "0")
    code, body = box.http("GET", "/status")
    assert (code, body.strip()) == (200, '"OK"'), body + service_logs(box)


def test_remove_and_purge_leave_barman_its_configuration_and_its_home_untouched(backed_up, installed):
    box = installed
    box.check("systemctl", "stop", "pg-backup-api.service", "barman-cron.service")
    before = barmans_state(box)
    box.check("apt-get", "remove", "-y", "-q", "pg-backup-api")
    assert not (box.path / "usr/bin/pg-backup-api").exists()
    assert box.run("systemctl", "is-active", "pg-backup-api.service").stdout.strip() != "active"
    assert (box.path / "etc/pg-backup-api/gunicorn.conf.py").exists(), "remove keeps the conffiles"
    assert (box.path / "var/log/barman/pg-backup-api.log").exists(), "and the logs"
    changed = differences(before, barmans_state(box))
    assert not changed, changed
    box.check("apt-get", "purge", "-y", "-q", "pg-backup-api")
    assert not (box.path / "etc/pg-backup-api").exists() and not (box.path / "etc/default/pg-backup-api").exists()
    assert not (box.path / "var/log/barman/pg-backup-api.log").exists(), "purge deletes gunicorn's logs"
    assert not (box.path / "var/cache/pg-backup-api").exists()
    changed = differences(before, barmans_state(box))
    assert not changed, changed
    assert box.check("dpkg-query", "-W", "-f", "${Status}", "barman") == "install ok installed"
    assert box.check("id", "-un", "barman").strip() == "barman"
    listed = box.check(*as_user("barman", "barman", "list-backup", SERVER))
    assert SERVER in listed and "FAILED" not in listed, listed
