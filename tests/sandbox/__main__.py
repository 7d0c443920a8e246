"""The sandbox's command line; see the package's docstring.

    python -m tests.sandbox up DIR                      build (or reuse) everything under DIR, write DIR/env
    python -m tests.sandbox down DIR [--purge]          stop every process started for DIR; --purge deletes DIR
    python -m tests.sandbox psql DIR PORT SQL           psql -Atc SQL as postgres on DIR's socket, database labdb
    python -m tests.sandbox start-copy DIR DATADIR PORT start a restored cluster on 127.0.0.1:PORT
    python -m tests.sandbox stop-copy DIR DATADIR       stop it

Tunables (environment): SANDBOX_PGPORT=5499 SANDBOX_SSH_PORT=2222 SANDBOX_BARMAN_USER=barman
SANDBOX_SERVER=pg PGBA_VENV=/opt/pg-backup-api/venv SANDBOX_CRON_INTERVAL=60 (0: no cron loop).
"""

from __future__ import annotations

import os
import sys
from typing import List

from . import SandboxError, down, environment_settings, psql, start_copy, stop_copy, up


def usage() -> int:
    print(__doc__.split("\n\n", 1)[1].rstrip(), file=sys.stderr)
    return 2


def main(argv: List[str]) -> int:
    if not argv:
        return usage()
    command, args = argv[0], argv[1:]
    if command == "up" and len(args) == 1:
        box = up(args[0], **environment_settings(os.environ))  # type: ignore[arg-type]
        print(f"{box['SANDBOX_DIR']}/env")
    elif command == "down" and (len(args) == 1 or (len(args) == 2 and args[1] == "--purge")):
        # The ports do not matter to down: it finds DIR's processes by DIR.
        fallback = {k: v for k, v in environment_settings(os.environ).items() if k in ("barman_user", "server", "venv")}
        down(args[0], purge=len(args) == 2, **fallback)  # type: ignore[arg-type]
    elif command == "psql" and len(args) == 3:
        print(psql(args[0], args[1], args[2]))
    elif command == "start-copy" and len(args) == 3:
        start_copy(args[0], args[1], args[2])
    elif command == "stop-copy" and len(args) == 2:
        stop_copy(args[0], args[1])
    else:
        return usage()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SandboxError as error:
        print(f"sandbox: ERROR: {error}", file=sys.stderr)
        sys.exit(1)
