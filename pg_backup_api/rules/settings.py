"""Service settings: defaults, then the service's own INI file, then PG_BACKUP_API_* variables.

    [api]
    auth = none | token            ; token: every request but /status needs a bearer token
    tokens_file = /etc/pg-backup-api/tokens.json
    audit_log = /var/log/barman/pg-backup-api-audit.log
    max_body_bytes = 65536
    cancel_grace = 10              ; seconds between SIGTERM and SIGKILL when canceling
    check_timeout = 60             ; seconds a `barman check`, `status` or `diagnose` may take
    check_interval = 300           ; seconds between background `barman check` runs for /metrics
    max_streams = 12               ; output streams (?follow=1) one process serves at once, 429 beyond
    trusted_proxies = 127.0.0.1 ::1  ; where a vouching proxy may connect from
    proxy_secret_file = /etc/pg-backup-api/proxy-secret  ; what it sends to vouch (see auth.py); empty: none
    ; `-o` options remote_ssh_command may use beyond the default allowlist (see ssh_command.py)
    ssh_options = StrictHostKeyChecking UserKnownHostsFile
    ssh_multiplex = on             ; off: Barman opens its own ssh connections (see ssh_master.py)
    ssh_connect_timeout = 10       ; seconds the worker's ssh may take to connect and exchange banners; 0: ssh's own
    ssh_server_alive_interval = 15 ; seconds between keepalives of the worker's ssh; 0: none
    ssh_server_alive_count_max = 4 ; keepalives unanswered before that ssh gives up
    copy_retry_times = 2           ; barman restore --retry-times: a copy cut off (ssh master lost) is retried
    copy_retry_sleep = 5           ; barman restore --retry-sleep, seconds
    max_recoveries_per_host = 4    ; recoveries running at once into one target host; more wait, queued
    max_queued_per_host = 16       ; recoveries waiting for a slot on one host; 429 beyond
    max_queued = 64                ; recoveries waiting for a slot, all hosts together; 429 beyond

    [server pg]                    ; optional, narrows what a recovery of server `pg` may target
    allowed_hosts = db2.example.org 10.0.0.5
    allowed_destinations = /var/lib/postgresql/15/
    ; added to the [api] ssh_options for this server's recoveries
    ssh_options = IdentitiesOnly
"""

from __future__ import annotations

import configparser
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Mapping, Optional, Tuple

from pg_backup_api.rules import ssh_command

DEFAULT_BARMAN_CONF = "/etc/barman.conf"
DEFAULT_CONFIG = "/etc/pg-backup-api/pg-backup-api.conf"
DEFAULT_TOKENS_FILE = "/etc/pg-backup-api/tokens.json"
DEFAULT_PROXY_SECRET_FILE = "/etc/pg-backup-api/proxy-secret"
DEFAULT_PORT = 7480
LOOPBACK = "127.0.0.1"
AUTH_MODES = ("none", "token")


@dataclass(frozen=True)
class ServerPolicy:
    """Optional narrowing of where a Barman server's recoveries may go."""

    allowed_hosts: Tuple[str, ...] = ()
    allowed_destinations: Tuple[str, ...] = ()
    ssh_options: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    barman_conf: str = DEFAULT_BARMAN_CONF
    port: int = DEFAULT_PORT
    log_level: str = "INFO"
    cancel_grace: float = 10.0
    check_timeout: float = 60.0
    check_interval: float = 300.0  # seconds between two background `barman check` runs for /metrics
    max_streams: int = 12  # output streams (?follow=1) one process serves at once; keep below gunicorn's threads
    auth: str = "none"
    tokens_file: str = DEFAULT_TOKENS_FILE
    audit_log: Optional[str] = None  # None: <barman_home>/pg-backup-api-audit.log
    max_body_bytes: int = 64 * 1024
    trusted_proxies: Tuple[str, ...] = ("127.0.0.1", "::1")
    # The secret a proxy sends to vouch for a client certificate; None: no request is vouched for.
    proxy_secret_file: Optional[str] = DEFAULT_PROXY_SECRET_FILE
    ssh_options: Tuple[str, ...] = ()
    ssh_multiplex: bool = True
    # The worker's ssh (its master and the command Barman runs): a port that accepts TCP but never
    # speaks ssh, or a connection that goes silent, must fail the recovery rather than hold its slot.
    ssh_connect_timeout: int = 10
    ssh_server_alive_interval: int = 15
    ssh_server_alive_count_max: int = 4
    # `barman restore --retry-times/--retry-sleep`: an rsync cut off with its connection (the ssh master
    # lost) is run again; 0 leaves the server's basebackup_retry_times.
    copy_retry_times: int = 2
    copy_retry_sleep: int = 5
    max_recoveries_per_host: int = 4  # recoveries into one target host running at once; the others wait
    max_queued_per_host: int = 16  # recoveries waiting for a slot on one host; a POST beyond is a 429
    max_queued: int = 64  # recoveries waiting for a slot on any host; a POST beyond is a 429
    servers: Dict[str, ServerPolicy] = field(default_factory=dict)

    def policy(self, server: str) -> ServerPolicy:
        return self.servers.get(server, ServerPolicy())

    def ssh_options_for(self, server: Optional[str]) -> FrozenSet[str]:
        """The `-o` options beyond the default allowlist that recoveries of *server* may use."""
        extra = self.policy(server).ssh_options if server else ()
        return frozenset(self.ssh_options) | frozenset(extra)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        """Read the config file named by PG_BACKUP_API_CONFIG (if any), then the environment."""
        env = os.environ if environ is None else environ
        values: Dict[str, str] = {}
        servers: Dict[str, ServerPolicy] = {}
        path = env.get("PG_BACKUP_API_CONFIG")
        if path or os.path.exists(DEFAULT_CONFIG):
            values, servers = _read_file(path or DEFAULT_CONFIG)
        for key in ("barman_conf", "port", "log_level", "cancel_grace", "check_timeout", "check_interval",
                    "max_streams", "auth", "tokens_file", "audit_log", "max_body_bytes", "ssh_options",
                    "ssh_multiplex", "ssh_connect_timeout", "ssh_server_alive_interval", "ssh_server_alive_count_max",
                    "copy_retry_times", "copy_retry_sleep", "max_recoveries_per_host", "max_queued_per_host",
                    "max_queued", "proxy_secret_file"):
            if f"PG_BACKUP_API_{key.upper()}" in env:
                values[key] = env[f"PG_BACKUP_API_{key.upper()}"]
        return cls(
            barman_conf=values.get("barman_conf") or DEFAULT_BARMAN_CONF,
            port=_integer(values, "port", DEFAULT_PORT, 1, 65535),
            log_level=values.get("log_level", "INFO").upper(),
            cancel_grace=_seconds(values, "cancel_grace", 10.0),
            check_timeout=_seconds(values, "check_timeout", 60.0),
            check_interval=_seconds(values, "check_interval", 300.0, low=10, high=86400),
            max_streams=_integer(values, "max_streams", 12, 1, 1000),
            auth=_choice(values, "auth", AUTH_MODES),
            tokens_file=values.get("tokens_file") or DEFAULT_TOKENS_FILE,
            audit_log=values.get("audit_log") or None,
            max_body_bytes=_integer(values, "max_body_bytes", 64 * 1024, 1024, 16 * 1024 * 1024),
            trusted_proxies=tuple(values.get("trusted_proxies", "127.0.0.1 ::1").replace(",", " ").split()),
            proxy_secret_file=values.get("proxy_secret_file", DEFAULT_PROXY_SECRET_FILE).strip() or None,
            ssh_options=ssh_command.option_names(values.get("ssh_options", ""), "[api] or PG_BACKUP_API_SSH_OPTIONS"),
            ssh_multiplex=_switch(values, "ssh_multiplex", True),
            ssh_connect_timeout=_integer(values, "ssh_connect_timeout", 10, 0, 3600),
            ssh_server_alive_interval=_integer(values, "ssh_server_alive_interval", 15, 0, 3600),
            ssh_server_alive_count_max=_integer(values, "ssh_server_alive_count_max", 4, 1, 100),
            copy_retry_times=_integer(values, "copy_retry_times", 2, 0, 100),
            copy_retry_sleep=_integer(values, "copy_retry_sleep", 5, 0, 3600),
            max_recoveries_per_host=_integer(values, "max_recoveries_per_host", 4, 1, 1000),
            max_queued_per_host=_integer(values, "max_queued_per_host", 16, 0, 10000),
            max_queued=_integer(values, "max_queued", 64, 0, 10000),
            servers=servers,
        )


def _read_file(path: str) -> Tuple[Dict[str, str], Dict[str, ServerPolicy]]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as f:
            parser.read_file(f)
    except (OSError, configparser.Error) as exc:
        raise ValueError(f"cannot read the pg-backup-api configuration {path}: {exc}") from None
    values = dict(parser["api"]) if parser.has_section("api") else {}
    servers = {}
    for section in parser.sections():
        if section.startswith("server "):
            options = parser[section]
            servers[section[len("server "):].strip()] = ServerPolicy(
                tuple(options.get("allowed_hosts", "").replace(",", " ").split()),
                tuple(options.get("allowed_destinations", "").replace(",", " ").split()),
                ssh_command.option_names(options.get("ssh_options", ""), f"{path} [{section}]"),
            )
        elif section != "api":
            raise ValueError(f"{path}: unknown section [{section}] (use [api] or [server NAME])")
    return values, servers


def _integer(values: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = values.get(key)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,18}", raw.strip()) or not low <= int(raw) <= high:
        raise ValueError(f"{key} must be an integer from {low} to {high}, not {raw!r}")
    return int(raw)


def _seconds(values: Mapping[str, str], key: str, default: float, low: float = 0, high: float = 3600) -> float:
    raw = values.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key} must be a number of seconds, not {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{key} must be between {low:g} and {high:g} seconds")
    return value


SWITCH_VALUES = {"on": True, "yes": True, "true": True, "1": True, "off": False, "no": False, "false": False,
                 "0": False}


def _switch(values: Mapping[str, str], key: str, default: bool) -> bool:
    raw = values.get(key)
    if raw is None:
        return default
    value = SWITCH_VALUES.get(raw.strip().lower())
    if value is None:
        raise ValueError(f"{key} must be on or off, not {raw!r}")
    return value


def _choice(values: Mapping[str, str], key: str, choices: Tuple[str, ...]) -> str:
    value = values.get(key, choices[0]).strip().lower()
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, not {value!r}")
    return value


def setup_logging(level: str) -> None:
    """Log to stderr: gunicorn, systemd's journal and the worker's log file all collect it."""
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
