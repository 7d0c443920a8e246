"""The client commands of `pg-backup-api`: recover, backup, operations, show, cancel, wait, over HTTP.

`requests` is imported inside the functions that talk to the API, so importing this module
(which the `pg-backup-api` parser does for every command, workers included) stays cheap.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, TextIO, Tuple
from urllib.parse import quote

if TYPE_CHECKING:
    from pg_backup_api.rules.settings import Settings

DEFAULT_URL = "http://127.0.0.1:7480"
POLL_SECONDS = 1.0
# Polling rides out a proxy or service restart: connection errors and 502/503/504 are
# retried for this long before --wait gives up (the operation itself is not affected).
POLL_OUTAGE_SECONDS = 60.0
TRANSIENT_STATUSES = (502, 503, 504)
EXIT_INTERRUPTED = 130


class ClientError(Exception):
    """A request that did not get a usable answer; the message is what the user reads."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _reason(exc: Exception) -> str:
    """The readable part of a requests/urllib3 exception, without pool and object reprs."""
    text = str(exc)
    for pattern in (r"\[SSL: [A-Z_]+\] ([^()'\"]+)", r"\[Errno -?\d+\] ([^()'\"]+)"):
        found = re.search(pattern, text)
        if found:
            return found.group(1).strip()
    quoted = re.findall(r"'([^'<>]+)'", text)  # the innermost cause is quoted last
    if quoted:
        return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", quoted[-1]).strip()
    return exc.__class__.__name__


class Api:
    """One API endpoint: base URL, TLS material, token, timeout; JSON in, JSON out."""

    def __init__(self, args: argparse.Namespace) -> None:
        import requests

        self.url = args.url.rstrip("/")
        self.timeout = args.timeout
        self.session = requests.Session()
        self.session.headers["Accept"] = "application/json"
        if args.token:
            self.session.headers["Authorization"] = f"Bearer {args.token}"
        self.cert = ((args.cert, args.key) if args.key else args.cert) if args.cert else None
        # Passed with each request: a Session's own `verify` loses to $REQUESTS_CA_BUNDLE.
        self.verify = args.cacert or True

    def call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None,
             params: Optional[Dict[str, Any]] = None) -> Any:
        import requests

        url = self.url + path
        try:
            response = self.session.request(method, url, json=body, params=params, timeout=self.timeout,
                                            cert=self.cert, verify=self.verify)
        except requests.exceptions.SSLError as exc:
            raise ClientError(f"TLS error talking to {self.url}: {self._tls_hint(_reason(exc))}") from None
        except requests.exceptions.Timeout:
            raise ClientError(f"no answer from {self.url} within {self.timeout:g} s (--timeout)") from None
        except requests.exceptions.ConnectionError as exc:
            raise ClientError(f"cannot connect to {self.url}: {_reason(exc)}") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema):
            raise ClientError(f"{self.url} is not a valid URL (use e.g. {DEFAULT_URL})") from None
        except requests.RequestException as exc:
            raise ClientError(f"request to {url} failed: {_reason(exc)}") from None
        except OSError as exc:  # e.g. an unreadable --cert, --key or --cacert file
            raise ClientError(f"request to {url} failed: {exc}") from None
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if response.ok and doc is not None:
            return doc
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            raise ClientError(f"{response.status_code} {printable(doc['error'])}", response.status_code)
        # Not the service's JSON: a proxy's page, say. Show its start, on one line.
        text = printable(" ".join(response.text.split())[:200] or response.reason)
        if response.ok:
            raise ClientError(f"{response.status_code} not a JSON answer (is {self.url} pg-backup-api?): {text}",
                              response.status_code)
        raise ClientError(f"{response.status_code} {text}", response.status_code)

    def _tls_hint(self, reason: str) -> str:
        if "certificate verify failed" in reason and self.verify is True:
            return f"{reason}; give the CA of the server's certificate with --cacert"
        if "certificate verify failed" not in reason and self.cert is None:
            return f"{reason}; does the server want a client certificate (--cert, --key)?"
        return reason


def _server_path(server: str, *parts: str) -> str:
    return "/servers/" + "/".join(quote(p, safe="") for p in (server, *parts))


# -- output ------------------------------------------------------------------------------

# What a terminal acts on rather than shows: C0 controls, DEL and C1 (clear the screen, set the
# window title, move the cursor, ...); the line and paragraph separators, which str.splitlines cuts at;
# and the bidirectional overrides and isolates, which reorder what is shown. The service's answers
# carry text from clients and Barman.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
SPACED_CONTROLS = frozenset("\t\n\r\x0b\x0c\x85\u2028\u2029")


def printable(value: Any) -> str:
    """*value* as one line a terminal shows as it is: tabs and line breaks become spaces, every other
    control character is dropped. Every value the client prints from an answer goes through here."""
    text = value if isinstance(value, str) else _value(value)
    return CONTROL_CHARACTERS.sub(lambda m: " " if m.group() in SPACED_CONTROLS else "", text)


def printable_lines(text: str) -> List[str]:
    """*text* (Barman's output) as printable lines, cut where `str.splitlines` cuts."""
    return [printable(line) for line in text.splitlines()]



def clock(seconds: float) -> str:
    """[MM:SS], or [H:MM:SS] past an hour."""
    minutes, secs = divmod(int(max(seconds, 0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"[{hours}:{minutes:02d}:{secs:02d}]" if hours else f"[{minutes:02d}:{secs:02d}]"


class Progress:
    """One updating line on a terminal; elsewhere a plain line each time the phase changes."""

    def __init__(self, stream: TextIO, tty: bool) -> None:
        self.stream = stream
        self.tty = tty
        self.last: Optional[str] = None
        self.open_line = False

    def update(self, elapsed: float, status: str, phase: str) -> None:
        label = printable(f"{status} {phase}".strip())
        if self.tty:
            self.stream.write(f"\r{clock(elapsed)} {label}\033[K")
            self.open_line = True
        elif label != self.last:
            self.stream.write(f"{clock(elapsed)} {label}\n")
        self.last = label
        self.stream.flush()

    def close(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


SHOWN_FIRST = (("type", "type"), ("backup_id", "backup"), ("resolved_backup_id", "resolved backup"),
               ("new_backup_id", "new backup"), ("name", "name"), ("destination_directory", "destination"),
               ("remote_ssh_command", "ssh command"), ("start_time", "started"), ("end_time", "ended"),
               ("duration_s", "duration"), ("phase", "phase"), ("exit_code", "exit code"),
               ("reason", "reason"), ("requested_by", "requested by"))
NOT_SHOWN = {"operation_id", "status", "state", "output", "output_tail", "recovery_id"}


def render_operation(doc: Dict[str, Any]) -> str:
    """An operation's status document as aligned `label  value` lines, then its output."""
    status = f"{doc.get('status')} ({doc['state']})" if doc.get("state") else str(doc.get("status"))
    rows: List[Tuple[str, Any]] = [("operation", doc.get("operation_id")), ("status", status)]
    for key, label in SHOWN_FIRST:
        value = doc.get(key)
        if key == "duration_s" and isinstance(value, (int, float)):
            rows.append((label, f"{value:g} s"))
        elif value is not None:
            rows.append((label, value))
    # Whatever else the status carries (recovery targets, options), under its field name.
    known = {key for key, _ in SHOWN_FIRST} | NOT_SHOWN
    rows += [(key, value) for key, value in doc.items() if key not in known and value is not None]
    shown = [(printable(label), printable(value)) for label, value in rows]
    width = max(len(label) for label, _ in shown)
    lines = [f"{label.ljust(width)}  {value}" for label, value in shown]
    tail = doc.get("output_tail")
    if tail and isinstance(tail, list):
        lines += ["recent output:", *(f"  {line}" for line in printable_lines("\n".join(map(str, tail))))]
    if doc.get("output"):
        lines += ["output:", *(f"  {line}" for line in printable_lines(str(doc["output"])))]
    return "\n".join(lines)


def _fail(message: str) -> int:
    print("\n".join(printable(f"pg-backup-api: {line}" if i == 0 else line)
                    for i, line in enumerate(message.split("\n"))), file=sys.stderr)
    return 1


def _follow_hint(args: argparse.Namespace, op_id: str) -> str:
    where = "" if args.url == DEFAULT_URL else f" --url {args.url}"
    return (f"follow it with `pg-backup-api show{where} --server {args.server} {op_id}`, "
            f"cancel it with `pg-backup-api cancel{where} --server {args.server} {op_id}`")


# -- waiting -----------------------------------------------------------------------------


STREAM_READ_TIMEOUT = 60.0  # the service sends a keepalive every 15 s
LINE_END = re.compile("\r\n|\r|\n")


def _sse_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """The lines of an event stream as the SSE specification cuts them: at CR, LF or CRLF, nowhere else."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer, first = "", True
    for chunk in chunks:
        buffer += decoder.decode(chunk)
        if first and buffer:
            buffer, first = buffer[1:] if buffer[0] == "\ufeff" else buffer, False
        start = 0
        for end in LINE_END.finditer(buffer):
            if end.group() == "\r" and end.end() == len(buffer):
                break  # perhaps the first half of a CRLF: wait for the next chunk
            yield buffer[start:end.start()]
            start = end.end()
        buffer = buffer[start:]
    if buffer.endswith("\r"):
        yield buffer[:-1]


def sse_events(chunks: Iterable[bytes]) -> Iterator[Tuple[str, str]]:
    """(event type, data) of each event of a `text/event-stream`, by the SSE specification's rules:
    `field: value` (one space after the colon is dropped), `data` lines joined with LF, an empty line
    dispatches, comments and other fields are ignored, an event cut off by the end is not dispatched."""
    name, data = "", []
    for line in _sse_lines(chunks):
        if not line:
            if data:
                yield name or "message", "\n".join(data)
            name, data = "", []
            continue
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)


def follow_stream(api: Api, path: str, progress: Progress, started: float) -> Optional[Dict[str, Any]]:
    """Follow `.../output?follow=1` until its final status event; None when the stream is not
    available (an older service, a proxy that refuses it, 429) or breaks: the caller polls then."""
    import requests

    from pg_backup_api.core.model import PHASE_MARKERS

    try:
        response = api.session.get(f"{api.url}{path}/output", params={"follow": "1"}, stream=True,
                                   headers={"Accept": "text/event-stream"}, cert=api.cert, verify=api.verify,
                                   timeout=(api.timeout, STREAM_READ_TIMEOUT))
    except (requests.RequestException, OSError):
        return None
    with response:
        if response.status_code != 200 or not response.headers.get("Content-Type", "").startswith(
                "text/event-stream"):
            return None
        phase = "preparing"
        try:
            for name, text in sse_events(response.iter_content(chunk_size=None)):
                if name == "status":
                    doc = json.loads(text)
                    return doc if isinstance(doc, dict) else None
                if name != "message":
                    continue
                phase = next((p for marker, p in PHASE_MARKERS if text.startswith(marker)), phase)
                elapsed = time.monotonic() - started
                # The output of an operation that ended at once arrives in one burst: show
                # progress only from where a poll would have seen the operation running.
                if elapsed >= POLL_SECONDS:
                    progress.update(elapsed, "IN_PROGRESS", phase)
        except (requests.RequestException, OSError, ValueError):
            return None
    return None


def wait_for(api: Api, args: argparse.Namespace, op_id: str) -> int:
    """Follow the operation's event stream (or poll) until it ends: 0 when DONE, 1 when FAILED (its
    output goes to stderr)."""
    path = _server_path(args.server, "operations", op_id)
    progress = Progress(sys.stdout, sys.stdout.isatty())
    started = time.monotonic()
    outage_since: Optional[float] = None
    try:
        final = follow_stream(api, path, progress, started)
        if final is not None and final.get("status") != "IN_PROGRESS":
            progress.close()
            elapsed = final.get("duration_s")
            return _ended(final, op_id, elapsed if isinstance(elapsed, (int, float)) else time.monotonic() - started)
        while True:
            try:
                doc = api.call("GET", path)
            except ClientError as exc:
                transient = exc.status is None or exc.status in TRANSIENT_STATUSES
                outage_since = outage_since or time.monotonic()
                if not transient or time.monotonic() - outage_since > POLL_OUTAGE_SECONDS:
                    progress.close()
                    return _fail(f"{exc.message}\nstopped waiting; operation {op_id} may still be running: "
                                 + _follow_hint(args, op_id))
                time.sleep(POLL_SECONDS)
                continue
            outage_since = None
            status = doc.get("status")
            elapsed = doc.get("duration_s")
            if not isinstance(elapsed, (int, float)):
                elapsed = time.monotonic() - started
            if status != "IN_PROGRESS":
                progress.close()
                return _ended(doc, op_id, elapsed)
            progress.update(elapsed, status, doc.get("phase") or "")
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        progress.close()
        print(f"pg-backup-api: stopped waiting; operation {op_id} keeps running on the server: "
              + _follow_hint(args, op_id), file=sys.stderr)
        return EXIT_INTERRUPTED


def _ended(doc: Dict[str, Any], op_id: str, elapsed: float) -> int:
    if doc.get("status") == "DONE":
        print(f"{clock(elapsed)} DONE operation {printable(op_id)} ({printable(doc.get('type'))}) "
              f"in {elapsed:g} s")
        if doc.get("new_backup_id"):
            print(f"new backup: {printable(doc['new_backup_id'])}")
        return 0
    for line in printable_lines(str(doc.get("output") or "")):
        print(line, file=sys.stderr)
    why = printable(doc.get("reason") or f"exit code {doc.get('exit_code')}")
    print(f"{clock(elapsed)} {printable(doc.get('status'))} operation {printable(op_id)} "
          f"({printable(doc.get('state'))}): {why}", file=sys.stderr)
    return 1


# -- commands ----------------------------------------------------------------------------


def _start(api: Api, args: argparse.Namespace, body: Dict[str, Any]) -> int:
    op_id = printable(api.call("POST", _server_path(args.server, "operations"), body)["operation_id"])
    print(op_id, flush=True)
    return wait_for(api, args, op_id) if args.wait else 0


def _recover(api: Api, args: argparse.Namespace) -> int:
    body: Dict[str, Any] = {"type": "recovery", "backup_id": args.backup,
                            "destination_directory": args.destination, "remote_ssh_command": args.ssh_command}
    for field in ("target_time", "target_xid", "target_lsn", "target_name", "target_action", "target_tli",
                  "get_wal", "bwlimit", "jobs", "network_compression", "staging_wal_directory"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    for flag in ("target_immediate", "exclusive", "standby_mode"):
        if getattr(args, flag):
            body[flag] = True
    if args.tablespaces:
        body["tablespaces"] = args.tablespaces
    return _start(api, args, body)


def _backup(api: Api, args: argparse.Namespace) -> int:
    body: Dict[str, Any] = {"type": "backup"}
    if args.name is not None:
        body["name"] = args.name
    if args.immediate_checkpoint:
        body["immediate_checkpoint"] = True
    return _start(api, args, body)


def _operations(api: Api, args: argparse.Namespace) -> int:
    params = {key: getattr(args, key) for key in ("status", "type", "limit", "after")
              if getattr(args, key) is not None}
    doc = api.call("GET", _server_path(args.server, "operations"), params=params or None)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    operations = doc.get("operations", [])
    if not operations:
        print("no operations", file=sys.stderr)
    else:
        rows = [(printable(op.get("id")), printable(op.get("type"))) for op in operations]
        width = max(len("ID"), *(len(op_id) for op_id, _ in rows))
        print(f"{'ID'.ljust(width)}  TYPE")
        for op_id, op_type in rows:
            print(f"{op_id.ljust(width)}  {op_type}")
    if doc.get("next"):
        print(f"more: add --after {printable(doc['next'])}", file=sys.stderr)
    return 0


def _show(api: Api, args: argparse.Namespace) -> int:
    doc = api.call("GET", _server_path(args.server, "operations", args.operation_id))
    print(json.dumps(doc, indent=2) if args.json else render_operation(doc))
    return 0


def _cancel(api: Api, args: argparse.Namespace) -> int:
    doc = api.call("POST", _server_path(args.server, "operations", args.operation_id, "cancel"))
    print(f"operation {printable(args.operation_id)}: {printable(doc.get('status'))} ({printable(doc.get('state'))})"
          + (f": {printable(doc['reason'])}" if doc.get("reason") else ""))
    return 0


def _wait(api: Api, args: argparse.Namespace) -> int:
    return wait_for(api, args, args.operation_id)


def _run(args: argparse.Namespace, settings: "Optional[Settings]") -> int:
    """The entry of every client command: resolve the common options, call, map errors to exit 1."""
    args.url = args.url or os.environ.get("PG_BACKUP_API_URL") or DEFAULT_URL
    args.token = args.token or os.environ.get("PG_BACKUP_API_TOKEN") or None
    if args.key and not args.cert:
        args.client_parser.error("--key needs --cert")
    try:
        return args.client_command(Api(args), args)
    except ClientError as exc:
        return _fail(exc.message)
    except KeyboardInterrupt:
        print("pg-backup-api: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# -- the parser --------------------------------------------------------------------------


def target_tli(text: str) -> Any:
    if text in ("current", "latest"):
        return text
    if re.fullmatch(r"[0-9]{1,10}", text) and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a timeline: a number, 'current' or 'latest'")


class TablespaceAction(argparse.Action):
    """--tablespace NAME:LOCATION, repeatable, into a dict; each name once."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: Optional[str] = None) -> None:
        name, sep, location = str(value).partition(":")
        if not sep or not name or not location:
            parser.error(f"--tablespace {value!r}: use NAME:LOCATION, e.g. tbs1:/srv/pg/tbs1")
        tablespaces = dict(getattr(namespace, self.dest) or {})
        if name in tablespaces:
            parser.error(f"--tablespace: tablespace {name!r} is given twice")
        tablespaces[name] = location
        setattr(namespace, self.dest, tablespaces)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument("--url", help=f"the API's base URL (default $PG_BACKUP_API_URL or {DEFAULT_URL})")
    group.add_argument("--cert", metavar="FILE", help="client certificate (PEM) for an mTLS proxy")
    group.add_argument("--key", metavar="FILE", help="its private key, if not in --cert")
    group.add_argument("--cacert", metavar="FILE", help="CA bundle to verify the server's certificate")
    group.add_argument("--token", help="bearer token (default $PG_BACKUP_API_TOKEN)")
    group.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                       help="per request (default 30)")
    return common


def add_client_commands(commands: "argparse._SubParsersAction") -> None:
    """Add recover, backup, operations, show, cancel and wait to the `pg-backup-api` parser."""
    common = _common_options()

    def command(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.add_argument("--server", required=True, help="the Barman server")
        sub.set_defaults(func=_run, client_command=func, client_parser=sub)
        return sub

    recover = command("recover", _recover, "client: recover a backup onto a host through the API")
    recover.add_argument("--backup", required=True, metavar="BACKUP",
                         help="backup id, name, latest, oldest, latest-full, or auto with a time/LSN target")
    recover.add_argument("--destination", required=True, metavar="DIR", help="data directory on the target host")
    recover.add_argument("--ssh-command", required=True, metavar="CMD", help='e.g. "ssh postgres@db2"')
    recover.add_argument("--target-time", metavar="T", help="ISO-8601 with an offset")
    recover.add_argument("--target-xid", metavar="X")
    recover.add_argument("--target-lsn", metavar="L")
    recover.add_argument("--target-name", metavar="N")
    recover.add_argument("--target-immediate", action="store_true")
    recover.add_argument("--target-action", choices=("pause", "shutdown", "promote"))
    recover.add_argument("--target-tli", type=target_tli, metavar="TLI", help="a number, current or latest")
    recover.add_argument("--exclusive", action="store_true")
    recover.add_argument("--standby-mode", action="store_true")
    recover.add_argument("--get-wal", action=argparse.BooleanOptionalAction, default=None)
    recover.add_argument("--network-compression", action=argparse.BooleanOptionalAction, default=None)
    recover.add_argument("--bwlimit", type=int, metavar="KBPS")
    recover.add_argument("--jobs", type=int, metavar="N")
    recover.add_argument("--staging-wal-directory", metavar="DIR")
    recover.add_argument("--tablespace", action=TablespaceAction, dest="tablespaces", metavar="NAME:LOCATION",
                         help="relocate a tablespace (repeatable)")
    recover.add_argument("--wait", action="store_true", help="follow it until it ends; exit 1 if it fails")

    backup = command("backup", _backup, "client: take a backup through the API")
    backup.add_argument("--name", help="a name to recover it by later")
    backup.add_argument("--immediate-checkpoint", action="store_true")
    backup.add_argument("--wait", action="store_true", help="follow it until it ends; exit 1 if it fails")

    operations = command("operations", _operations, "client: list a server's operations")
    operations.add_argument("--status", choices=("IN_PROGRESS", "DONE", "FAILED"))
    operations.add_argument("--type", choices=("recovery", "backup", "config_switch"))
    operations.add_argument("--limit", type=int, metavar="N")
    operations.add_argument("--after", metavar="ID", help="the page after this id (what `more:` says)")
    operations.add_argument("--json", action="store_true", help="print the API's JSON")

    show = command("show", _show, "client: show one operation")
    show.add_argument("operation_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print the API's JSON")

    cancel = command("cancel", _cancel, "client: cancel a running operation")
    cancel.add_argument("operation_id", metavar="ID")

    wait = command("wait", _wait, "client: follow an operation until it ends; exit 1 if it fails")
    wait.add_argument("operation_id", metavar="ID")
