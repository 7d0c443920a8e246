"""Routes that watch rather than act: GET /metrics, the read-only web page under /ui/, and the
streamed output of an operation. Added to the API's blueprint, so tokens and errors work the same."""

from __future__ import annotations

import time
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from flask import Flask, Response, abort, current_app, g, render_template, request, send_from_directory

from pg_backup_api.core.errors import ApiError, InvalidRequest
from pg_backup_api.core.model import State, parse_time
from pg_backup_api.http import streaming
from pg_backup_api.http.api import bp

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_BACKUP_AGE = 24 * 3600.0
OPERATIONS_SHOWN = 50


def install(app: Flask, service: Any) -> None:
    """Per application: the metrics collector and the limit of open streams."""
    from pg_backup_api.http.metrics import Metrics

    app.extensions["pg_backup_api.http.metrics"] = Metrics(service)
    app.extensions["pg_backup_api.streams"] = streaming.StreamSlots(service.settings.max_streams)
    # The API's output route streams through this layer above it, so it finds it here, not by import.
    app.extensions["pg_backup_api.output_response"] = output_response
    app.teardown_request(_give_back_unserved_slots)


def _service() -> Any:
    return current_app.extensions["pg_backup_api"]


@bp.get("/metrics")
def metrics() -> Response:
    from pg_backup_api.http.metrics import CONTENT_TYPE

    return Response(current_app.extensions["pg_backup_api.http.metrics"].exposition(), content_type=CONTENT_TYPE)


def output_response(service: Any, server: Optional[str], op_id: str, query: Dict[str, str]) -> Response:
    """`?follow=1`: the output as an event stream; `?follow=0`: as text, as without it."""
    unknown = sorted(repr(name)[:80] for name in query if name != "follow")
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s): {', '.join(unknown)}; allowed: follow")
    follow = streaming.FOLLOW_VALUES.get(query["follow"])
    if follow is None:
        raise InvalidRequest("query parameter 'follow' must be 1 or 0 (true/false, yes/no)")
    store = service._store(server)
    service._reconciled(store, store.get(op_id))  # 404 for an unknown operation, before any stream
    if not follow:
        return Response(service.operation_output(server, op_id), mimetype="text/plain")
    slot = current_app.extensions["pg_backup_api.streams"].take()
    # Until the server holds the response, the end of the request gives the slot back (see below).
    g.stream_slots = [*g.get("stream_slots", []), slot]
    events = streaming.follow(store, op_id, lambda: service._reconciled(store, store.get(op_id)))
    return StreamResponse(events, slot, mimetype="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class StreamResponse(Response):
    """An event stream holding a stream slot, given back when the server closes the response.

    A WSGI server closes the body it was handed however the response ends: sent whole, a HEAD
    (whose body is never iterated), a client gone before the first byte or later, an error while
    iterating. Werkzeug's development server skips the close when the client reset the connection
    (it fails reading what is left of the request first), so a response dropped unclosed gives its
    slot back too. A response that never reaches the server (an error replaced it) gives it back
    at the end of the request.
    """

    def __init__(self, events: Iterator[bytes], slot: streaming.Slot, **kwargs: Any) -> None:
        super().__init__(events, **kwargs)
        self.slot = slot
        self.call_on_close(slot.release)
        weakref.finalize(self, slot.release)

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = super().__call__(environ, start_response)
        self.slot.served = True  # from here, the server's close() of *body* gives the slot back
        return body


def _give_back_unserved_slots(error: Optional[BaseException]) -> None:
    for slot in g.pop("stream_slots", []):
        if not slot.served:
            slot.release()


# -- the web page ---------------------------------------------------------------------------------

@bp.get("/ui/")
def ui_shell() -> str:
    """The page's frame: no data in it; its script fetches each view with the token it holds."""
    return render_template("shell.html")


@bp.get("/ui/static/<path:name>")
def ui_static(name: str) -> Response:
    if name not in {"ui.js", "ui.css"}:
        abort(404)
    return send_from_directory(STATIC_DIR, name, max_age=300)


@bp.get("/ui/view")
def ui_view() -> str:
    """One view, as an HTML fragment: `?server=S&operation=ID`, `?server=S`, or the servers."""
    query = request.args.to_dict()
    unknown = sorted(repr(name)[:80] for name in query if name not in ("server", "operation"))
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s): {', '.join(unknown)}; allowed: server, operation")
    service = _service()
    server, operation = query.get("server"), query.get("operation")
    if operation is not None:
        if server is None:
            raise InvalidRequest("query parameter 'operation' needs 'server'")
        return render_template("operation.html", server=server, op=service.get_operation(server, operation))
    if server is not None:
        return render_template("server.html", **server_view(service, server))
    return render_template("servers.html", servers=servers_view(service), barman=service.discovery.barman())


def _age(now: float, moment: Optional[float]) -> Optional[float]:
    return None if moment is None else max(0.0, now - moment)


def servers_view(service: Any) -> List[Dict[str, Any]]:
    config = service.config_source.get()
    metrics = current_app.extensions["pg_backup_api.http.metrics"]
    now = time.time()
    rows = []
    for summary in service.discovery.list_servers():
        catalogue = metrics.catalogues.get(config.server(summary["name"]))
        done = [b for b in catalogue.backups if b.status == "DONE"]
        limit = catalogue.last_backup_maximum_age or DEFAULT_MAX_BACKUP_AGE
        age = _age(now, done[-1].end) if done else None
        rows.append({**summary, "backups": len(catalogue.backups), "last_backup": done[-1] if done else None,
                     "age": age, "max_age": limit, "stale": age is None or age > limit})
    return rows


def server_view(service: Any, server: str) -> Dict[str, Any]:
    config = service.config_source.get()
    catalogue = current_app.extensions["pg_backup_api.http.metrics"].catalogues.get(config.server(server))
    done = [b for b in catalogue.backups if b.status == "DONE"]
    times = [t for b in catalogue.backups for t in (b.begin, b.end) if t is not None]
    window = None
    if done and done[0].begin is not None:
        end = max(filter(None, [catalogue.last_wal_time, done[-1].end]), default=done[0].begin)
        window = (done[0].begin, end)
        times.append(end)
    low, high = (min(times), max(times)) if times else (0.0, 1.0)
    span = max(high - low, 1.0)

    def pos(moment: float) -> float:
        return round(100.0 * (moment - low) / span, 3)

    operations = []
    listing = service.list_operations(server)["operations"][-OPERATIONS_SHOWN:]
    for op in reversed(listing):
        try:
            operations.append(service.get_operation(server, op["id"]))
        except ApiError:
            continue
    return {"server": server, "catalogue": catalogue, "window": window, "pos": pos, "low": low, "high": high,
            "operations": operations, "fmt": fmt_time, "running": State.RUNNING.value}


def fmt_time(moment: Optional[float]) -> str:
    if moment is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


def fmt_age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "never"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


@bp.app_template_filter("age")
def age_filter(seconds: Optional[float]) -> str:
    return fmt_age(seconds)


@bp.app_template_filter("when")
def when_filter(value: Any) -> str:
    if isinstance(value, (int, float)):
        return fmt_time(value)
    moment = parse_time(value)
    return fmt_time(moment.timestamp()) if moment else "-"

