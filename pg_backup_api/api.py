"""The HTTP layer: routes only. Parse the request, call the service, answer JSON."""

from __future__ import annotations

import json
import logging
from typing import Any, Optional, Tuple

from flask import Blueprint, Flask, Response, current_app, jsonify, request, url_for
from werkzeug.exceptions import HTTPException

from pg_backup_api import schema
from pg_backup_api.errors import ApiError, InvalidRequest
from pg_backup_api.service import Service

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__)


def _service() -> Service:
    return current_app.extensions["pg_backup_api"]


def _json_body() -> Any:
    if not request.is_json:
        raise InvalidRequest("the request body must be JSON, sent with Content-Type: application/json")
    raw = request.get_data(cache=False)
    if not raw.strip():
        raise InvalidRequest("the request body is empty: a JSON object is required")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


@bp.get("/status")
def status() -> Response:
    return jsonify("OK")


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(schema.document())


@bp.get("/diagnose")
def diagnose() -> Response:
    return jsonify(_service().diagnose())


@bp.get("/servers/<server_name>/operations")
@bp.get("/operations", defaults={"server_name": None})
def list_operations(server_name: Optional[str]) -> Response:
    # Without query parameters the answer is exactly the reference's {"operations": [...]}.
    return jsonify(_service().list_operations(server_name, request.args.to_dict()))


@bp.post("/servers/<server_name>/operations")
@bp.post("/operations", defaults={"server_name": None})
def create_operation(server_name: Optional[str]) -> Tuple[Response, int, dict]:
    op_id = _service().create_operation(server_name, _json_body())
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
    text = _service().operation_output(server_name, operation_id)
    return Response(text, mimetype="text/plain")


@bp.post("/servers/<server_name>/operations/<operation_id>/cancel")
@bp.post("/operations/<operation_id>/cancel", defaults={"server_name": None})
def cancel_operation(server_name: Optional[str], operation_id: str) -> Response:
    return jsonify(_service().cancel_operation(server_name, operation_id))


def register_error_handlers(app: Flask) -> None:
    """Every error leaves as {"error": "..."}: clients such as Patroni parse every body as JSON."""

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Tuple[Response, int]:
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.path, exc.message)
        return jsonify({"error": exc.message}), exc.status

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
