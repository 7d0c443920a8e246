"""gunicorn settings for pg-backup-api; install as /etc/pg-backup-api/gunicorn.conf.py.

    gunicorn -c /etc/pg-backup-api/gunicorn.conf.py pg_backup_api.app:application

Overridable from the environment (/etc/default/pg-backup-api under systemd):
PG_BACKUP_API_BIND (127.0.0.1:7480), PG_BACKUP_API_WORKERS (2), PG_BACKUP_API_THREADS (16), PG_BACKUP_API_LOG_DIR
(/var/log/barman), PG_BACKUP_API_LOG_LEVEL (INFO, shared with the application).
"""

import os
import sys

LOG_DIR = os.environ.get("PG_BACKUP_API_LOG_DIR", "/var/log/barman")


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default)).strip()
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a positive integer, not {raw!r}")
    return int(raw)


def _log_file(name: str) -> str:
    """LOG_DIR/name if this user can append to it, else "-" (stderr, i.e. the journal).

    A log file gunicorn cannot open would stop it from booting at all: a service without its
    log file is better than no service.
    """
    path = os.path.join(LOG_DIR, name)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        print(f"pg-backup-api: cannot write {path} ({exc.strerror}): logging to stderr instead",
              file=sys.stderr, flush=True)
        return "-"
    return path


# Loopback only: the service trusts its reverse proxy, which authenticates clients.
bind = [os.environ.get("PG_BACKUP_API_BIND", "127.0.0.1:7480")]
workers = _positive_int("PG_BACKUP_API_WORKERS", 2)
# Threads: a slow request (GET /diagnose runs `barman diagnose`, several seconds) does not hold
# up /status or a client polling its operation.
# gthread, but with each request head read by the worker's main loop, not by a thread: a client that
# sends half a request (or nothing) holds no thread, and is closed after 10 s (pg_backup_api/http/gunicorn_worker.py).
worker_class = "pg_backup_api.http.gunicorn_worker.HeadFirstWorker"
# Connections one worker holds at once (waiting heads and kept-alive ones included); the worker raises
# its limit of open files to fit them.
worker_connections = 1000
# How long an idle kept-alive connection stays open (gunicorn's default, stated).
keepalive = 2
# What Apache in front lets through (LimitRequestLine, LimitRequestFieldSize: 8190; LimitRequestFields:
# 100, plus the 5 headers the vhost adds), so that Apache, with its JSON error bodies, is the one to refuse
# an over-long request: gunicorn's own refusals are HTML pages.
limit_request_line = 8190
limit_request_field_size = 8190
limit_request_fields = 120
# An output stream (GET .../output?follow=1) holds a thread while its operation runs: the service
# serves at most `max_streams` (12) per worker and answers 429 beyond, so 4 threads stay free for
# every other request. Raise both together.
threads = _positive_int("PG_BACKUP_API_THREADS", 16)
# With gthread this is how long a worker may go without showing it is alive; the requests
# themselves are bounded by the application (barman diagnose: 120 s) and by Apache's timeout.
timeout = 120
# On SIGTERM (systemctl stop/restart) requests in flight get this long to finish.
graceful_timeout = 30
# Headers with "_" would alias proxy-set ones (X-Client-Cert_Subject vs X-Client-Cert-Subject):
# drop them (gunicorn's default since 22.0, stated for older versions' sake).
header_map = "drop"


def pre_request(worker: object, req: object) -> None:
    """Drop every header whose name holds "_", before gunicorn builds the request's environ.

    gunicorn before 22.0 (Debian 12 ships 20.1) ignores header_map: there a client's
    X-Client-Cert_Subject lands in the same environ key as the proxy's X-Client-Cert-Subject, the two
    joined by a comma, so a client could append to the subject the proxy vouches for.
    """
    req.headers = [(name, value) for name, value in req.headers if "_" not in name]  # type: ignore[attr-defined]


# The heartbeat file of each worker: keep it off the disk when /dev/shm is there.
worker_tmp_dir = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
proc_name = "pg-backup-api"
# gunicorn >= 25.1 opens a control socket in $HOME/.gunicorn (barman_home for the barman user)
# unless told not to; systemd's signals are all this service needs.
control_socket_disable = True

loglevel = os.environ.get("PG_BACKUP_API_LOG_LEVEL", "info").lower()
accesslog = _log_file("pg-backup-api-access.log")
errorlog = _log_file("pg-backup-api.log")
# The application logs to stderr: send that to the error log file too (when there is one).
capture_output = True
