"""The HTTP layer: routes only. Parse the request, call the service, answer JSON."""

from __future__ import annotations

import json
import logging
from typing import Any, Optional, Tuple

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request, url_for
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from pg_backup_api.core.errors import ApiError, InvalidRequest, TooBusy
from pg_backup_api.core.model import now_utc, timestamp
from pg_backup_api.service import auth
from pg_backup_api.service.use_cases import Service
from pg_backup_api.store import audit

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__)

# Sent with every answer. The page (/ui/) runs only its own script and style files (no inline code, no
# style attribute), fetches from this origin only and may not be framed; no answer is sniffed as
# another type than the one it is sent as, and no address leaks in a Referer.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# The web page's shell and its script hold no data: each view asks for its content with the token.
OPEN_ENDPOINTS = ("api.status", "api.ui_shell", "api.ui_static")
# Endpoints that need more than the method's scope: diagnose shows every server's full configuration.
ENDPOINT_SCOPES = {"api.diagnose": "admin"}


def _service() -> Service:
    return current_app.extensions["pg_backup_api"]


def _cert_subject() -> Optional[str]:
    """The client certificate's subject, when a trusted proxy vouches for it (see auth.vouched_subject)."""
    service = _service()
    return auth.vouched_subject(request.remote_addr, request.headers, service.settings.trusted_proxies,
                                service.proxy_secret)


def _requester() -> Optional[str]:
    """Who asked, as recorded in the job file: the token's name or the verified certificate subject."""
    if g.get("token") is not None:
        return f"token:{g.token.name}"
    subject = _cert_subject()
    return f"cert:{subject}" if subject else None


def _json_body() -> Any:
    if not request.is_json:
        raise InvalidRequest("the request body must be JSON, sent with Content-Type: application/json")
    limit = request.max_content_length
    try:
        raw = request.get_data(cache=False)
        if (request.content_length is None and limit is not None and len(raw) >= limit
                and request.environ["wsgi.input"].read(1)):
            # werkzeug cuts a streamed (chunked) body at the limit without a word: one more byte says it was longer.
            raise RequestEntityTooLarge()
    except HTTPException:
        raise
    except Exception as exc:  # the WSGI server refuses a body it cannot read (gunicorn: a malformed chunk)
        raise InvalidRequest(f"the request body cannot be read: {str(exc)[:200]}") from None
    if not raw.strip():
        raise InvalidRequest("the request body is empty: a JSON object is required")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        # Python's parser recurses once per [ or {: a body of 64 KiB can nest deeper than it goes.
        raise InvalidRequest("the request body is nested too deeply to be read") from None


@bp.before_request
def authenticate() -> None:
    """With `auth = token`, every endpoint but /status needs a token: GET `read`, POST `operate`,
    /diagnose `admin`; creating and canceling config operations check `admin` in the service."""
    g.token = None
    service = _service()
    if service.settings.auth == "token" and request.endpoint not in OPEN_ENDPOINTS:
        needed = "read" if request.method in ("GET", "HEAD") else "operate"
        needed = ENDPOINT_SCOPES.get(request.endpoint or "", needed)
        g.token = service.tokens.check(request.headers.get("Authorization"), needed)


@bp.after_app_request
def security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@bp.after_request
def record_audit(response: Response) -> Response:
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return response
    service = _service()
    entry: dict = {"time": timestamp(now_utc()), "remote_addr": request.remote_addr}
    if g.get("token") is not None:
        entry["token"] = g.token.name
    subject = _cert_subject()
    if subject:
        entry["client_cert_subject"] = subject
    entry.update(method=request.method, path=request.path, status=response.status_code)
    body = response.get_json(silent=True) if response.is_json else None
    op_id = (request.view_args or {}).get("operation_id")
    if isinstance(body, dict):
        op_id = body.get("operation_id") or op_id
        if "error" in body:
            entry["error"] = body["error"]
    if op_id:
        entry["operation_id"] = op_id
    path = service.audit_log_path()
    if path is not None:
        audit.append(path, entry)
    return response


@bp.get("/status")
def status() -> Response:
    return jsonify("OK")


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(_service().discovery.openapi_document())


@bp.get("/diagnose")
def diagnose() -> Response:
    return jsonify(_service().discovery.diagnose())


@bp.get("/servers")
def list_servers() -> Response:
    service = _service()
    return jsonify({"servers": service.discovery.list_servers(),
                    "config_changes_queue": service.discovery.config_changes_queue(),
                    "barman": service.discovery.barman()})


@bp.get("/servers/<server_name>")
def server_status(server_name: str) -> Response:
    return jsonify(_service().discovery.server_status(server_name))


@bp.get("/servers/<server_name>/backups")
def list_backups(server_name: str) -> Response:
    return jsonify({"backups": _service().discovery.list_backups(server_name)})


@bp.get("/servers/<server_name>/backups/<backup_id>")
def show_backup(server_name: str, backup_id: str) -> Response:
    return jsonify(_service().discovery.show_backup(server_name, backup_id))


@bp.get("/servers/<server_name>/check")
def check_server(server_name: str) -> Response:
    return jsonify(_service().discovery.check_server(server_name))


@bp.get("/servers/<server_name>/operations")
@bp.get("/operations", defaults={"server_name": None})
def list_operations(server_name: Optional[str]) -> Response:
    if request.args:
        return jsonify(_service().list_operations(server_name, request.args.to_dict()))
    # Without query parameters the answer is exactly the reference's {"operations": [...]}.
    return Response(_service().operations_json(server_name), mimetype="application/json")


@bp.post("/servers/<server_name>/operations")
@bp.post("/operations", defaults={"server_name": None})
def create_operation(server_name: Optional[str]) -> Tuple[Response, int, dict]:
    op_id = _service().create_operation(server_name, _json_body(), _requester(), g.get("token"))
    if server_name is None:
        location = url_for("api.get_operation", operation_id=op_id)
    else:
        location = url_for("api.get_operation", server_name=server_name, operation_id=op_id)
    return jsonify({"operation_id": op_id}), 202, {"Location": location}


@bp.get("/servers/<server_name>/operations/<operation_id>")
@bp.get("/operations/<operation_id>", defaults={"server_name": None})
def get_operation(server_name: Optional[str], operation_id: str) -> Response:
    return jsonify(_service().get_operation(server_name, operation_id))


@bp.get("/servers/<server_name>/operations/<operation_id>/output")
@bp.get("/operations/<operation_id>/output", defaults={"server_name": None})
def operation_output(server_name: Optional[str], operation_id: str) -> Response:
    if request.args:
        # observe.output_response, registered by observe.install (the layer above this one).
        streamed = current_app.extensions["pg_backup_api.output_response"]
        return streamed(_service(), server_name, operation_id, request.args.to_dict())
    text = _service().operation_output(server_name, operation_id)
    return Response(text, mimetype="text/plain")


@bp.post("/servers/<server_name>/operations/<operation_id>/cancel")
@bp.post("/operations/<operation_id>/cancel", defaults={"server_name": None})
def cancel_operation(server_name: Optional[str], operation_id: str) -> Response:
    return jsonify(_service().cancel_operation(server_name, operation_id, g.get("token")))


def register_error_handlers(app: Flask) -> None:
    """Every error leaves as {"error": "..."}: clients such as Patroni parse every body as JSON."""

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Tuple[Response, int]:
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.path, exc.message)
        response = jsonify({"error": exc.message})
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="pg-backup-api"'
        if isinstance(exc, TooBusy):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response, exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Tuple[Response, int]:
        messages = {
            404: f"no such endpoint: {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
            413: f"the request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes",
        }
        code = exc.code or 500
        response = jsonify({"error": messages.get(code, exc.description)})
        if code == 405 and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response, code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Tuple[Response, int]:
        log.exception("%s %s failed", request.method, request.path)
        return jsonify({"error": "internal error; the service log has the details"}), 500
