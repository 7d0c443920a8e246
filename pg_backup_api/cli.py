"""The `pg-backup-api` command: the service, its health checks, and the worker entry points."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import timedelta
from typing import Any, List, Optional

from pg_backup_api.rules.settings import DEFAULT_PORT, LOOPBACK, Settings, setup_logging


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from pg_backup_api.http import serving
    from pg_backup_api.http.factory import create_app, with_status_shortcut

    app = with_status_shortcut(create_app(settings))
    # Loopback only: the service has no authentication of its own, a reverse proxy does that.
    serving.serve(LOOPBACK, args.port, app)
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


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from pg_backup_api.barman_io import features as barman_features
    from pg_backup_api.core.model import OperationType
    from pg_backup_api.store.claims import Claims
    from pg_backup_api.worker.runner import HostSlots, barman_home, run_operation

    try:
        barman_features.check_supported()
    except barman_features.UnsupportedBarman as exc:
        raise SystemExit(str(exc)) from None
    op_type = OperationType(args.operation_type)
    slots = None
    if op_type is OperationType.RECOVERY:
        service = None

        def lookup(server: Optional[str], op_id: str) -> Any:
            # A slot held by an operation whose worker is gone is freed by the service's reconciliation.
            # Made only when another recovery holds a slot: the service's modules import Barman's code,
            # which would otherwise delay every recovery's start.
            nonlocal service
            if service is None:
                from pg_backup_api.service.use_cases import Service

                service = Service(settings)
            return service.lookup(server, op_id)

        slots = HostSlots(Claims(lambda: barman_home(settings.barman_conf, None) / "jobs", lookup),
                          settings.max_recoveries_per_host)
    return run_operation(op_type, settings.barman_conf, getattr(args, "server_name", None), args.operation_id,
                         slots)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `2w` or a number of seconds."""
    unit = text[-1:] if text[-1:] in DURATION_UNITS else "s"
    number = text[:-1] if text[-1:] in DURATION_UNITS else text
    if not re.fullmatch(r"[0-9]{1,9}", number):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30d, 12h, 90m or 2w")
    return timedelta(seconds=int(number) * DURATION_UNITS[unit])


def _prune(args: argparse.Namespace, settings: Settings) -> int:
    from pg_backup_api.core.errors import ApiError
    from pg_backup_api.service.use_cases import Service

    try:
        removed = Service(settings).prune(args.older_than, args.dry_run, args.server)
    except ApiError as exc:
        print(f"pg-backup-api prune: {exc.message}", file=sys.stderr)
        return 1
    verb = "would remove" if args.dry_run else "removed"
    for op in removed:
        where = op["server"] or "(instance)"
        print(f"{verb} {where} {op['operation_id']} {op['type']} {op['status']} ended {op['end_time']}")
    print(f"{len(removed)} operation(s) {verb}; running operations are never removed")
    return 0


def _doctor(args: argparse.Namespace, settings: Settings) -> int:
    from pg_backup_api.service import doctor
    from pg_backup_api.service.use_cases import Service

    findings = doctor.run(Service(settings), fix=args.fix)
    for finding in findings:
        print(f"{'ok  ' if finding.ok else 'FAIL'} {finding.check}: {finding.message}")
    failed = [f for f in findings if not f.ok]
    print(f"{len(failed)} problem(s) found" if failed else "no problem found")
    return 1 if failed else 0


def _refresh_checks(args: argparse.Namespace, settings: Settings) -> int:
    from pg_backup_api.http.metrics import refresh_checks

    return refresh_checks(settings.barman_conf, settings.check_timeout)


def _token(args: argparse.Namespace, settings: Settings) -> int:
    from pg_backup_api.service.auth import TokenFile

    tokens = TokenFile(settings.tokens_file)
    try:
        if args.action == "create":
            secret = tokens.create(args.name, args.scope)
            print(secret)
            print(f"token '{args.name}' (scope {args.scope}) added to {settings.tokens_file}; "
                  "this is the only time it is shown", file=sys.stderr)
        elif args.action == "revoke":
            if not tokens.revoke(args.name):
                print(f"no token named '{args.name}'", file=sys.stderr)
                return 1
            print(f"token '{args.name}' revoked")
        else:
            for token in tokens.list():
                print(f"{token.name}\t{token.scope}\t{token.created}")
    except (ValueError, OSError) as exc:
        print(f"pg-backup-api token: {exc}", file=sys.stderr)
        return 1
    return 0


DEFAULT_APACHE_INCLUDE = "/etc/apache2/pg-backup-api/proxy-secret.conf"


def _proxy_secret(args: argparse.Namespace, settings: Settings) -> int:
    import grp
    from pathlib import Path

    from pg_backup_api.service.auth import write_proxy_secret

    if not settings.proxy_secret_file:
        print("pg-backup-api proxy-secret: proxy_secret_file is empty in the settings: no proxy can vouch",
              file=sys.stderr)
        return 1
    try:
        group = grp.getgrnam(args.group).gr_gid
        write_proxy_secret(Path(settings.proxy_secret_file), Path(args.apache_include), group)
    except (KeyError, OSError) as exc:
        print(f"pg-backup-api proxy-secret: {exc}", file=sys.stderr)
        return 1
    print(f"a new secret is in {settings.proxy_secret_file} (group {args.group}) and {args.apache_include}; "
          "reload Apache (systemctl reload apache2): until then the service records no certificate subject")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pg-backup-api", description="A REST API for Barman.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the service (development server, loopback only)")
    serve.add_argument("--port", type=int, default=None, help=f"TCP port (default {DEFAULT_PORT})")
    serve.set_defaults(func=_serve)

    status = commands.add_parser("status", help="check that the service answers")
    status.add_argument("--port", type=int, default=None, help=f"TCP port (default {DEFAULT_PORT})")
    status.set_defaults(func=_status)

    prune = commands.add_parser("prune", help="remove the files of operations that ended long ago")
    prune.add_argument("--older-than", type=duration, required=True, metavar="AGE",
                       help="ended more than AGE ago: 30d, 12h, 90m, 2w")
    prune.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    prune.add_argument("--server", help="only this Barman server's operations")
    prune.set_defaults(func=_prune)

    doctor = commands.add_parser("doctor", help="check Barman's configuration, its change queue and the "
                                                "operations' state files; exit 1 when something is wrong")
    doctor.add_argument("--fix", action="store_true",
                        help="move unreadable state files into <barman_home>/jobs/quarantine/")
    doctor.set_defaults(func=_doctor)

    token = commands.add_parser("token", help="manage API tokens (used when auth = token)")
    token_actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = token_actions.add_parser("create", help="add a token and print it once")
    create.add_argument("name")
    create.add_argument("--scope", choices=("read", "operate", "admin"), required=True)
    revoke = token_actions.add_parser("revoke", help="remove a token")
    revoke.add_argument("name")
    token_actions.add_parser("list", help="names, scopes and creation times")
    token.set_defaults(func=_token)

    proxy = commands.add_parser("proxy-secret", help="as root: make the secret with which the Apache vhost vouches "
                                                     "for client certificates (again: change it)")
    proxy.add_argument("--apache-include", default=DEFAULT_APACHE_INCLUDE, metavar="FILE",
                       help=f"the file the vhost includes (default {DEFAULT_APACHE_INCLUDE})")
    proxy.add_argument("--group", default="barman", help="the service's group, which reads proxy_secret_file "
                                                         "(default barman)")
    proxy.set_defaults(func=_proxy_secret)

    # The workers the service spawns, one per operation type (the reference's names).
    for name, op_type, per_server in [("recovery", "recovery", True), ("run-backup", "backup", True),
                                      ("config-switch", "config_switch", True),
                                      ("config-update", "config_update", False)]:
        worker = commands.add_parser(name, help=f"worker: run a stored {op_type} operation")
        if per_server:
            worker.add_argument("--server-name", required=True)
        worker.add_argument("--operation-id", required=True)
        worker.set_defaults(func=_worker, operation_type=op_type)

    refresh = commands.add_parser("refresh-checks", help="worker: run `barman check all` for /metrics")
    refresh.set_defaults(func=_refresh_checks)

    from pg_backup_api.client import add_client_commands

    add_client_commands(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "client_command", None) is not None:
        # A client talks to an API that may be on another host: the service's settings
        # (and whether this user may read them) are none of its business.
        return args.func(args, None)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"pg-backup-api: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "port", None) is None and hasattr(args, "port"):
        args.port = settings.port
    setup_logging(settings.log_level)
    return args.func(args, settings)
