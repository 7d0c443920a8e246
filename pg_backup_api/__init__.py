"""pg-backup-api: a REST API that drives Barman."""

from __future__ import annotations

import logging
from typing import Optional

from flask import Flask

__version__ = "0.1.0"


def create_app(settings: Optional["Settings"] = None, spawn: Optional["Spawn"] = None) -> Flask:  # noqa: F821
    """The application factory; *settings* default to the PG_BACKUP_API_* environment.

    *spawn* replaces how workers are started: tests use it to stay in-process.
    """
    from pg_backup_api.api import bp, register_error_handlers
    from pg_backup_api.errors import ApiError
    from pg_backup_api.runner import spawn_worker
    from pg_backup_api.service import Service
    from pg_backup_api.settings import Settings

    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    service = Service(settings, spawn or spawn_worker)
    try:
        service.reconcile_all()
    except ApiError as exc:
        # Logged now so a broken configuration shows at start-up; requests answer 503 until fixed.
        logging.getLogger(__name__).error("%s", exc.message)
    app.extensions["pg_backup_api"] = service
    app.register_blueprint(bp)
    register_error_handlers(app)
    return app
