"""Process identity and stopping an operation's processes, with real processes."""

import os
import signal
import subprocess
import time
from functools import partial

from pg_backup_api.worker import processes

from .conftest import wait_for

wait_for = partial(wait_for, timeout=10)


def test_identity_names_one_process_for_ever():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        ident = processes.identity(proc.pid)
        assert processes.is_alive(ident)
        assert not processes.is_alive(processes.ProcessIdentity(proc.pid, ident.start_ticks + 1, ident.boot_id))
        assert not processes.is_alive(processes.ProcessIdentity(proc.pid, ident.start_ticks, "another-boot"))
    finally:
        proc.kill()
        proc.wait()
    assert not processes.is_alive(ident)


def test_only_the_marked_processes_of_a_group_are_stopped():
    # One group: an unmarked sleep (a stranger that got the same group number) and a marked one.
    group = subprocess.Popen(
        ["bash", "-c", f"sleep 60 & {processes.marker_entry('pg/20261127T010101')} sleep 60 & wait"],
        start_new_session=True)
    try:
        # Both sleeps have exec'd (a forked child carries the marker only once it has).
        wait_for(lambda: len(processes.group_members(group.pid)) == 3
                 and len(processes.group_members(group.pid, "pg/20261127T010101")) == 1)
        assert processes.stop_group(group.pid, "pg/20261127T010101", grace=2)
        # bash and the stranger live on (the stopped sleep may take a moment to be reaped: an exiting
        # process no longer shows its environment, so it no longer counts as marked)
        wait_for(lambda: len(processes.group_members(group.pid)) == 2)
        assert processes.group_members(group.pid, "pg/other") == []
    finally:
        os.killpg(group.pid, signal.SIGKILL)
        group.wait()


def test_stop_group_escalates_to_sigkill():
    group = subprocess.Popen(
        ["bash", "-c", f"trap '' TERM; {processes.marker_entry('pg/x')} bash -c \"trap '' TERM; sleep 60\""],
        start_new_session=True)
    try:
        wait_for(lambda: processes.group_members(group.pid, "pg/x"))
        started = time.monotonic()
        assert processes.stop_group(group.pid, "pg/x", grace=0.5)
        assert time.monotonic() - started < 5
    finally:
        os.killpg(group.pid, signal.SIGKILL)
        group.wait()
