"""The Flask application factory, and the WSGI shortcut of `GET /status`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Optional

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication
    from flask import Flask

    from pg_backup_api.rules.settings import Settings
    from pg_backup_api.service.use_cases import Spawn
    from pg_backup_api.worker.target_probe import Probe

def create_app(settings: Optional["Settings"] = None, spawn: Optional["Spawn"] = None,
               probe: Optional["Probe"] = None) -> "Flask":
    """The application factory; *settings* default to the PG_BACKUP_API_* environment.

    *spawn* replaces how workers are started, *probe* how a recovery's target host is asked about its
    paths: tests use them to stay in-process and off the network.
    """
    # Imported here, not at the top: the worker (`python -m pg_backup_api recovery ...`) imports
    # this package too, and each recovery would pay for Flask's import otherwise.
    from flask import Flask

    from pg_backup_api.barman_io import adapter as barman_adapter
    from pg_backup_api.barman_io import features as barman_features
    from pg_backup_api.core.errors import ApiError
    from pg_backup_api.http import observe
    from pg_backup_api.http.api import bp, register_error_handlers
    from pg_backup_api.rules.settings import Settings
    from pg_backup_api.service.use_cases import Service
    from pg_backup_api.worker.runner import spawn_worker

    try:
        barman_adapter.check_supported()
    except barman_features.UnsupportedBarman as exc:
        raise SystemExit(str(exc)) from None
    settings = settings or Settings.from_env()
    # The name stays the package's (logs, sessions); templates live beside this module.
    app = Flask("pg_backup_api", root_path=str(Path(__file__).resolve().parent))
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    service = Service(settings, spawn or spawn_worker, probe)
    try:
        service.reconcile_all()
    except ApiError as exc:
        # Logged now so a broken configuration shows at start-up; requests answer 503 until fixed.
        logging.getLogger(__name__).error("%s", exc.message)
    app.extensions["pg_backup_api"] = service
    barman_adapter.preload()
    # Werkzeug answers a path with `//` (or an encoded `/` next to one) with a text/html 308 to
    # the merged path: the one answer that would not be JSON. Such a path is then a JSON 404.
    app.url_map.merge_slashes = False
    observe.install(app, service)
    app.register_blueprint(bp)
    # No automatic OPTIONS: its empty text/html answer would be the one response that is not JSON
    # (browsers' CORS is not for this API); OPTIONS is then a JSON 405 like any other method.
    for rule in app.url_map.iter_rules():
        rule.methods.discard("OPTIONS")
    register_error_handlers(app)
    return app


def with_status_shortcut(app: "Flask") -> "WSGIApplication":
    """*app* with `GET /status` answered before Flask: monitoring polls it often, and it needs
    nothing of the application (no token, no audit). The answer is byte for byte Flask's."""
    from pg_backup_api.http.api import SECURITY_HEADERS

    body = b'"OK"\n'
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *SECURITY_HEADERS.items()]

    def application(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/status" and environ.get("REQUEST_METHOD") == "GET":
            start_response("200 OK", headers)
            return [body]
        return app(environ, start_response)

    return application
