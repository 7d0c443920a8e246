"""Service settings: defaults overridden by PG_BACKUP_API_* environment variables."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional

DEFAULT_BARMAN_CONF = "/etc/barman.conf"
DEFAULT_PORT = 7480
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Settings:
    """What the service and its workers need to know before reading Barman's config."""

    barman_conf: str = DEFAULT_BARMAN_CONF
    port: int = DEFAULT_PORT
    log_level: str = "INFO"
    cancel_grace: float = 10.0  # seconds between SIGTERM and SIGKILL when canceling

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        env = os.environ if environ is None else environ
        port = env.get("PG_BACKUP_API_PORT", str(DEFAULT_PORT))
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"PG_BACKUP_API_PORT must be a TCP port number, not {port!r}")
        return cls(
            barman_conf=env.get("PG_BACKUP_API_BARMAN_CONF") or DEFAULT_BARMAN_CONF,
            port=int(port),
            log_level=env.get("PG_BACKUP_API_LOG_LEVEL", "INFO").upper(),
            cancel_grace=_number(env, "PG_BACKUP_API_CANCEL_GRACE", 10.0),
        )


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    return value


def setup_logging(level: str) -> None:
    """Log to stderr: gunicorn, systemd's journal and the worker's log file all collect it."""
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
