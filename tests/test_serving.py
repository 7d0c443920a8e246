"""The development server (`pg-backup-api serve`): JSON for the errors it answers itself, chunked bodies,
and bounds against slow clients (a deadline per request, a limit on connections)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from pg_backup_api.http import serving
from pg_backup_api.http.factory import create_app, with_status_shortcut
from pg_backup_api.rules.settings import Settings

from .conftest import wait_for

BODY = b'{"type": "backup"}'


@pytest.fixture
def dev_server(barman_files, spawned):
    """The service under the development server's own classes, on a free loopback port: its port."""
    servers = []

    def start(max_connections=50):
        app = with_status_shortcut(create_app(Settings(barman_conf=str(barman_files.conf)), spawn=spawned))
        server = serving.BoundedServer("127.0.0.1", 0, app, max_connections)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_port

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def exchange(port, data, timeout=5.0):
    """Everything the server answers to *data* until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return answer
            answer += chunk


def parsed(answer):
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def assert_json_error(answer, status):
    code, headers, body = parsed(answer)
    assert code == status, answer[:300]
    assert headers["Content-Type"] == "application/json"
    assert isinstance(json.loads(body)["error"], str)
    return json.loads(body)["error"]


def post(body, *headers):
    return (b"POST /servers/pg/operations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"".join(h + b"\r\n" for h in headers) + b"Connection: close\r\n\r\n" + body)


def chunked(body, size=0x4000):
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_the_dev_server_answers_an_over_long_request_line_with_a_json_414(dev_server):
    port = dev_server()
    assert "Too Long" in assert_json_error(exchange(port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"), 414)


def test_the_dev_server_answers_an_over_long_header_with_a_json_431(dev_server):
    port = dev_server()
    answer = exchange(port, b"GET /status HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 70000 + b"\r\n\r\n")
    assert "65536" in assert_json_error(answer, 431)


def test_the_dev_server_answers_too_many_headers_with_a_json_431(dev_server):
    port = dev_server()
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(200))
    assert "100 headers" in assert_json_error(exchange(port, b"GET /status HTTP/1.1\r\n" + many + b"\r\n"), 431)


@pytest.mark.parametrize("line", [b'GET /status HTTP/1.1"x', b"GET /status HTTP/9", b"\x16\x03\x01 TLS?"])
def test_the_dev_server_answers_a_malformed_request_line_with_a_json_400(dev_server, line):
    port = dev_server()
    assert_json_error(exchange(port, line + b"\r\nHost: x\r\n\r\n"), 400)


def test_the_dev_server_reads_a_chunked_body(dev_server, barman_files):
    port = dev_server()
    code, _, body = parsed(exchange(port, post(chunked(BODY, 5), b"Transfer-Encoding: chunked")))
    assert code == 202, body
    job = barman_files.home / "pg" / "jobs" / f"{json.loads(body)['operation_id']}.json"
    assert json.loads(job.read_text())["operation_type"] == "backup"


def test_a_chunked_body_over_max_body_bytes_is_a_413_not_an_empty_body(dev_server):
    port = dev_server()
    body = b'{"type": "backup", "name": "' + b"x" * 100_000 + b'"}'
    assert "larger than 65536" in assert_json_error(
        exchange(port, post(chunked(body), b"Transfer-Encoding: chunked"), timeout=20), 413)


@pytest.mark.parametrize("coding", [b"identity", b"gzip", b"br"])
def test_a_transfer_encoding_the_dev_server_cannot_read_is_a_json_501_not_an_empty_body(dev_server, coding):
    port = dev_server()
    answer = exchange(port, post(chunked(BODY), b"Transfer-Encoding: " + coding))
    assert "Transfer-Encoding" in assert_json_error(answer, 501)


def half_sent(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    return sock


def closed_by_server(sock):
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def test_the_dev_server_closes_a_half_sent_request_after_its_head_timeout(dev_server, monkeypatch):
    monkeypatch.setattr(serving, "HEAD_TIMEOUT", 0.5)
    port = dev_server()
    slow = [half_sent(port) for _ in range(20)]
    assert exchange(port, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").endswith(b'"OK"\n')
    started = time.monotonic()
    assert all(closed_by_server(sock) for sock in slow)
    assert time.monotonic() - started < 9  # long before the client's own 10 s timeout
    for sock in slow:
        sock.close()


def test_the_dev_server_closes_a_body_that_never_ends_after_its_body_timeout(dev_server, monkeypatch):
    monkeypatch.setattr(serving, "BODY_TIMEOUT", 0.5)
    port = dev_server()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(post(b'{"type": ', b"Content-Length: 18"))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert parsed(answer)[0] == 400  # the body broke off: werkzeug's "client disconnected", as JSON


def test_the_dev_server_serves_at_most_its_connections_and_answers_a_json_503_beyond(dev_server):
    port = dev_server(max_connections=5)
    slow = [half_sent(port) for _ in range(5)]
    time.sleep(0.2)
    answer = exchange(port, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert "too many connections" in assert_json_error(answer, 503)
    for sock in slow:
        sock.close()
    wait_for(lambda: exchange(port, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                              ).endswith(b'"OK"\n'))


def test_the_descriptor_limit_is_raised_so_the_connections_fit(monkeypatch):
    import resource

    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 524288))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    assert serving.connection_limit() == (serving.MAX_CONNECTIONS, serving.MAX_CONNECTIONS + serving.FD_RESERVE)
    assert calls == [(serving.MAX_CONNECTIONS + serving.FD_RESERVE, 524288)]
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 1024))
    assert serving.connection_limit() == (1024 - serving.FD_RESERVE, 1024)
