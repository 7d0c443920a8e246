"""Rules for paths on the target host that Barman writes to (and, with rsync --delete, wipes)."""

from __future__ import annotations

import posixpath
import re

from pg_backup_api.errors import InvalidRequest

SAFE_PATH = re.compile(r"/[A-Za-z0-9._/-]+")
SYSTEM_DIRECTORIES = frozenset(
    "/bin /boot /dev /etc /home /lib /lib32 /lib64 /libx32 /media /mnt /opt /proc /root /run "
    "/sbin /srv /sys /tmp /usr /var /var/lib /var/lib/postgresql /var/log /var/tmp "
    "/usr/local /usr/lib /usr/bin /usr/sbin".split()
)


def check_target_path(field: str, path: str) -> None:
    """Absolute, normalised, safe characters only, and never a system directory."""
    if not SAFE_PATH.fullmatch(path):
        raise InvalidRequest(
            f"field '{field}' must be an absolute path of letters, digits and ._-/ only; got {path!r}")
    if posixpath.normpath(path) != path or path.startswith("//"):
        raise InvalidRequest(
            f"field '{field}' must be a normalised absolute path (no '..', '.', '//' or trailing '/'); "
            f"got {path!r}")
    if path in SYSTEM_DIRECTORIES:
        raise InvalidRequest(f"field '{field}' must not be the system directory {path}")
