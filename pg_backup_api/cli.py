"""The `pg-backup-api` command: the service, its health check, and the worker entry points."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from pg_backup_api.settings import DEFAULT_PORT, LOOPBACK, Settings, setup_logging


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from werkzeug.serving import run_simple

    from pg_backup_api import create_app

    app = create_app(settings)
    # Loopback only: the service has no authentication of its own, a reverse proxy does that.
    run_simple(LOOPBACK, args.port, app, threaded=True, use_reloader=False)
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    import requests

    url = f"http://{LOOPBACK}:{args.port}/status"
    try:
        response = requests.get(url, timeout=5)
        ok = response.status_code == 200 and response.json() == "OK"
    except (requests.RequestException, ValueError) as exc:
        print(f"pg-backup-api is not reachable at {url}: {exc.__class__.__name__}")
        return 1
    if ok:
        print(f"pg-backup-api is up at {url}")
        return 0
    print(f"pg-backup-api at {url} answered {response.status_code}: {response.text.strip()[:200]}")
    return 1


def _recovery(args: argparse.Namespace, settings: Settings) -> int:
    from pg_backup_api.runner import run_recovery

    return run_recovery(settings.barman_conf, args.server_name, args.operation_id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pg-backup-api", description="A REST API for Barman.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the service (development server, loopback only)")
    serve.add_argument("--port", type=int, default=None, help=f"TCP port (default {DEFAULT_PORT})")
    serve.set_defaults(func=_serve)

    status = commands.add_parser("status", help="check that the service answers")
    status.add_argument("--port", type=int, default=None, help=f"TCP port (default {DEFAULT_PORT})")
    status.set_defaults(func=_status)

    recovery = commands.add_parser("recovery", help="worker: run a stored recovery operation")
    recovery.add_argument("--server-name", required=True)
    recovery.add_argument("--operation-id", required=True)
    recovery.set_defaults(func=_recovery)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"pg-backup-api: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "port", None) is None and hasattr(args, "port"):
        args.port = settings.port
    setup_logging(settings.log_level)
    return args.func(args, settings)
