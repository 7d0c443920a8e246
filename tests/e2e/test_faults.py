"""Barman's home on a full and on a read-only file system (a small tmpfs), on the real stack."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from .test_lifecycle import jobs_dir, post_recovery

pytestmark = pytest.mark.e2e


@contextmanager
def tmpfs_over(directory: Path, owner: str) -> Iterator[Path]:
    """*directory* on a tmpfs holding what it held and 1 MiB more; put back as it was (with anything new)
    after. Sized on what is there: earlier tests may have left megabytes of progress logs."""
    saved = Path(tempfile.mkdtemp(prefix="pgba-e2e-jobs-"))
    subprocess.run(["cp", "-a", str(directory), str(saved / "jobs")], check=True)  # owners and modes kept
    used = int(subprocess.run(["du", "-s", "-B1", str(directory)], capture_output=True, text=True,
                              check=True).stdout.split()[0])
    size = used + (used // 4) + (1 << 20)  # tmpfs rounds each file up to a page: keep a margin
    stat = directory.stat()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750,uid={stat.st_uid},gid={stat.st_gid}",
                    "tmpfs", str(directory)], check=True)
    try:
        subprocess.run(["cp", "-a", f"{saved}/jobs/.", str(directory)], check=True)
        yield directory
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(directory)], check=False)
        (directory / "filler").unlink(missing_ok=True)
        subprocess.run(["cp", "-a", f"{directory}/.", f"{saved}/jobs"], check=True)
        subprocess.run(["umount", str(directory)], check=True)
        subprocess.run(["cp", "-a", f"{saved}/jobs/.", str(directory)], check=True)
        shutil.rmtree(saved)
        subprocess.run(["chown", "-R", owner, str(directory)], check=True)


def job_files(directory: Path) -> set:
    return {n for n in os.listdir(directory) if n.endswith(".json") or n.endswith(".tmp")}


def test_a_full_then_read_only_home_refuses_posts_and_harms_nothing(sandbox, service):
    server = sandbox["BARMAN_SERVER"]
    # Destinations that hold a file: the target is reachable (the service looks at it before storing
    # anything) and Barman refuses each accepted recovery at once.
    existing = post_recovery(service, sandbox, str(sandbox.holding_files("e2e-full-existing")))
    existing_id = existing.json()["operation_id"]
    before = service.wait_until_ended(server, existing_id)
    directory = jobs_dir(sandbox)
    with tmpfs_over(directory, sandbox["BARMAN_USER"]):
        files = job_files(directory)
        # Fill it: dd stops with "No space left on device".
        subprocess.run(["dd", "if=/dev/zero", f"of={directory}/filler", "bs=64k"], capture_output=True)
        full = post_recovery(service, sandbox, str(sandbox.holding_files("e2e-full")))
        assert full.status_code == 507, full.text
        assert "No space left on device" in full.json()["error"]
        assert "nothing was stored" in full.json()["error"]
        assert job_files(directory) == files  # no job file, whole or half-written, no temporary file
        assert service.get(f"/servers/{server}/operations/{existing_id}").json() == before
        assert service.get(f"/servers/{server}/operations").status_code == 200

        (directory / "filler").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)
        read_only = post_recovery(service, sandbox, str(sandbox.holding_files("e2e-read-only")))
        assert read_only.status_code == 503, read_only.text
        assert "Read-only file system" in read_only.json()["error"]
        assert job_files(directory) == files
        assert service.get(f"/servers/{server}/operations/{existing_id}").json() == before
        subprocess.run(["mount", "-o", "remount,rw", str(directory)], check=True)
        # Space again: the same destination is free (the refused POSTs claimed nothing).
        again = post_recovery(service, sandbox, str(sandbox.holding_files("e2e-full")))
        assert again.status_code == 202, again.text
        # jobs/ is another folder now (the tmpfs mounted over it): the list follows the one the path names.
        listed = [o["id"] for o in service.get(f"/servers/{server}/operations").json()["operations"]]
        assert again.json()["operation_id"] in listed and existing_id in listed
        assert service.wait_until_ended(server, again.json()["operation_id"])["state"] == "failed"
