"""The gunicorn worker class of packaging/gunicorn.conf.py, in a real gunicorn with a small app: whole
requests are served however they arrive (in pieces, pipelined, with a body), and clients that send half
a request take no thread (tests/e2e/test_slow_clients.py runs the service itself)."""

from __future__ import annotations

import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, wait_for

APP = '''
def application(environ, start_response):
    body = environ["wsgi.input"].read()
    answer = (environ["PATH_INFO"] + " " + str(len(body))).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(answer)))])
    return [answer]
'''


@pytest.fixture
def gunicorn(tmp_path):
    """One worker of 2 threads: 2 slow clients would take every thread of plain gthread."""
    (tmp_path / "small_app.py").write_text(APP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(Path(sys.executable).parent / "gunicorn"), "--worker-class",
            "pg_backup_api.http.gunicorn_worker.HeadFirstWorker", "--workers", "1", "--threads", "2",
            "--bind", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "--no-control-socket", "small_app:application"]
    log = open(tmp_path / "gunicorn.log", "wb")
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for(lambda: b"/ready 0" in exchange(port, request("/ready")),
                 timeout=30, what="gunicorn answers")
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def request(path, body=b"", close=True):
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def exchange(port, *pieces, pause=0.0):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(pause)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer
    except OSError:
        return b""


def test_a_request_sent_in_pieces_is_served_whole(gunicorn):
    raw = request("/pieces", b"0123456789")
    assert exchange(gunicorn, *[raw[i:i + 7] for i in range(0, len(raw), 7)], pause=0.02).endswith(b"/pieces 10")


def test_pipelined_requests_on_one_kept_alive_connection_are_all_answered(gunicorn):
    raw = request("/one", b"ab", close=False) + request("/two", close=False) + request("/three", b"xyz")
    answer = exchange(gunicorn, raw)
    assert re.findall(rb"/[a-z]+ [0-9]+", answer) == [b"/one 2", b"/two 0", b"/three 3"]


def test_a_second_request_in_pieces_on_a_kept_alive_connection_is_served(gunicorn):
    second = request("/second", b"12345")
    answer = exchange(gunicorn, request("/first", close=False), second[:10], second[10:], pause=0.2)
    assert b"/first 0" in answer and answer.endswith(b"/second 5")


def test_clients_sending_half_a_request_take_no_thread(gunicorn):
    slow = []
    for _ in range(20):  # ten times the threads
        sock = socket.create_connection(("127.0.0.1", gunicorn), timeout=10)
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(sock)
    try:
        for _ in range(5):
            assert exchange(gunicorn, request("/status")).endswith(b"/status 0")
    finally:
        for sock in slow:
            sock.close()


def test_an_over_long_head_goes_to_gunicorns_parser_which_refuses_it(gunicorn):
    answer = exchange(gunicorn, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 414")


def test_a_header_with_an_underscore_cannot_append_to_the_subject_the_proxy_vouches_for(tmp_path, monkeypatch):
    """gunicorn before 22.0 (Debian 12's 20.1) ignores header_map and joins X-Client-Cert_Subject to the
    proxy's X-Client-Cert-Subject; header_map = "dangerous" parses as those versions did."""
    from gunicorn.config import Config
    from gunicorn.http import wsgi
    from gunicorn.http.message import Request
    from gunicorn.http.unreader import IterUnreader

    monkeypatch.setenv("PG_BACKUP_API_LOG_DIR", str(tmp_path))
    settings = runpy.run_path(str(ROOT / "packaging" / "gunicorn.conf.py"))
    cfg = Config()
    cfg.set("header_map", "dangerous")
    raw = (b"GET /status HTTP/1.1\r\nHost: x\r\nX-Client-Cert-Subject: CN=patroni\r\n"
           b"X-Client-Cert_Subject: CN=admin\r\n\r\n")
    req = Request(cfg, IterUnreader([raw]), ("127.0.0.1", 40000))
    settings["pre_request"](None, req)

    class Listener:
        def getsockname(self):
            return ("127.0.0.1", 7480)

    _, environ = wsgi.create(req, Listener(), ("127.0.0.1", 40000), ("127.0.0.1", 7480), cfg)
    assert environ["HTTP_X_CLIENT_CERT_SUBJECT"] == "CN=patroni"
