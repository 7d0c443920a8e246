"""The WSGI entry point for gunicorn: `gunicorn pg_backup_api.app:application`."""

from pg_backup_api.http.factory import create_app, with_status_shortcut
from pg_backup_api.rules.settings import Settings, setup_logging

_settings = Settings.from_env()
setup_logging(_settings.log_level)
application = with_status_shortcut(create_app(_settings))
