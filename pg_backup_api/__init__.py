"""pg-backup-api: a REST API that drives Barman."""

__version__ = "0.1.0"

# The application factory lives in factory.py; named here too, as the package's entry point.
from pg_backup_api.http.factory import create_app, with_status_shortcut  # noqa: E402

__all__ = ["__version__", "create_app", "with_status_shortcut"]
