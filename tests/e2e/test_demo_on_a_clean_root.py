"""The README's first command on a clean Debian 12 root: a clone of the repository runs `scripts/demo`
to the end with nothing installed beforehand (the root is debootstrap's minbase: no Python, no
PostgreSQL, no git); whatever the demo needs, scripts/bootstrap installs.

The root shares this machine's network (its apt and pip reach the registries, pip trusting the
certificate authorities it trusts here), so the demo's ports are free ones of this machine. It runs
without systemd (the demo needs none), under a stub init that reaps the detached workers.
"""

from __future__ import annotations

import subprocess

import pytest

from .conftest import ROOT, free_port
from .debian_root import CLEAN_ENV, NSPAWN, fresh_root, pip_trust
from .test_demo import assert_the_demo_restored_the_rows, free_port_with_copy

pytestmark = pytest.mark.e2e

CLONE = "/root/pg-backup-api"


def test_a_clone_runs_the_demo_to_the_end_on_a_clean_debian_root(tmp_path):
    with fresh_root(tmp_path, "root") as box:
        cloned = subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(box.path / CLONE[1:])],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        assert cloned.returncode == 0, cloned.stderr
        ports = [f"PGBA_DEMO_PORT={free_port()}", f"SANDBOX_PGPORT={free_port_with_copy()}",
                 f"SANDBOX_SSH_PORT={free_port()}"]
        binds, trust = pip_trust()
        run = subprocess.run([*NSPAWN, f"--directory={box.path}", "--pipe", "--as-pid2", *binds, "--",
                              *CLEAN_ENV, *trust, *ports, f"{CLONE}/scripts/demo"],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)
        shown = run.stdout[-6000:] + run.stderr[-4000:]
        assert_the_demo_restored_the_rows(run, shown)
