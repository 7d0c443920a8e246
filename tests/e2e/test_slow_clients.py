"""Slow clients on the real stack: 500 idle, half-sent requests held open against gunicorn run as the unit
runs it (packaging/gunicorn.conf.py), against `pg-backup-api serve`, and through the shipped Apache vhost
(with apache/pg-backup-api-mpm.conf); there also 500 half-sent TLS handshakes, which need no certificate.
Each time `/status` still answers 200 within the client's timeout, and the server closes the idle
connections once its timeout has passed. Speed is measured by bench/slow_clients.py, not here.
"""

from __future__ import annotations

import resource
import selectors
import shutil
import socket
import ssl
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
import requests

from .conftest import ROOT, Apache, Service, free_port, make_certificates, proxy_secret, wait_for
from .test_deployment import Gunicorn, api, unit_paths, work  # noqa: F401  (the service as the unit runs it)

SLOW = 500
CLIENT_TIMEOUT = 5  # seconds requests waits for /status
SERVER_CLOSES_WITHIN = 90  # seconds, well past each server's own timeout (5 to 20 s)
HALF_REQUEST = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
HALF_HANDSHAKE = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # a ClientHello's first bytes, announcing 512
MPM_CONF = ROOT / "apache" / "pg-backup-api-mpm.conf"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def enough_descriptors() -> None:
    """The test holds the slow connections itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4 * SLOW:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4 * SLOW, hard), hard))


@contextmanager
def held_open(connect: Callable[[], socket.socket], count: int = SLOW) -> Iterator[List[socket.socket]]:
    sockets = [connect() for _ in range(count)]
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def half_request(port: int, context: ssl.SSLContext = None) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        sock.sendall(HALF_REQUEST)
        return sock
    return connect


def half_handshake(port: int) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(HALF_HANDSHAKE)
        return sock
    return connect


def assert_status_answers(url: str, **kw) -> None:
    for _ in range(20):
        response = requests.get(f"{url}/status", timeout=CLIENT_TIMEOUT, **kw)
        assert (response.status_code, response.json()) == (200, "OK")


def assert_all_closed_by_the_server(sockets: List[socket.socket]) -> None:
    """Each connection ends from the server's side (end of file, a reset, or an error answer then the end)."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    open_ones = set(sockets)

    def all_ended() -> bool:
        for key, _ in selector.select(timeout=0.5):
            try:
                data = key.fileobj.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                continue
            except OSError:
                data = b""
            if not data:
                selector.unregister(key.fileobj)
                open_ones.discard(key.fileobj)
        return not open_ones

    wait_for(all_ended, timeout=SERVER_CLOSES_WITHIN, interval=0,
             what=f"the server closes the {len(sockets)} slow connections")
    selector.close()


# ------------------------------------------------------------------------------------------------

def test_the_packaged_gunicorn_answers_status_with_500_half_sent_requests_open_and_closes_them(api):  # noqa: F811
    with held_open(half_request(api.port)) as slow:
        assert_status_answers(api.url)
        assert_all_closed_by_the_server(slow)
    assert_status_answers(api.url)


def test_the_packaged_gunicorn_closes_a_connection_whose_body_never_comes(api):  # noqa: F811
    with socket.create_connection(("127.0.0.1", api.port), timeout=60) as sock:
        sock.sendall(b"POST /servers/pg/operations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        assert_all_closed_by_the_server([sock])
    assert_status_answers(api.url)


def test_the_dev_server_answers_status_with_500_half_sent_requests_open_and_closes_them(sandbox):
    service = Service(sandbox).start()
    try:
        with held_open(half_request(service.port)) as slow:
            assert_status_answers(service.url)
            assert_all_closed_by_the_server(slow)
        assert_status_answers(service.url)
    finally:
        service.stop()


def test_the_dev_server_answers_an_over_long_request_line_with_json(sandbox):
    service = Service(sandbox).start()
    try:
        response = requests.get(f"{service.url}/{'a' * 70000}", timeout=30)
        assert response.status_code == 414
        assert response.headers["Content-Type"] == "application/json"
        assert "Too Long" in response.json()["error"]
    finally:
        service.stop()


@pytest.fixture(scope="module")
def front(sandbox, api):  # noqa: F811
    """The shipped HTTPS vhost, with the shipped MPM sizing, in front of the unit's gunicorn: (url, tls)."""
    root = Path(tempfile.mkdtemp(prefix="pgba-slow-front-"))
    root.chmod(0o755)  # www-data reads the error bodies from here
    try:
        tls = make_certificates(root / "tls")
        server = Apache(root)
        shutil.copy(MPM_CONF, server.confdir / "conf-available" / MPM_CONF.name)
        server.run("a2enconf", MPM_CONF.stem)
        port = free_port()
        url = server.https_site("front", port, api.port, tls, proxy_secret(sandbox)["include"])
        server.start([port])
        try:
            yield url, port, tls
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def client_context(tls) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls["verify"])
    context.load_cert_chain(*tls["patroni"])
    return context


def test_the_apache_vhost_answers_status_with_500_half_sent_tls_handshakes_open_and_closes_them(front):
    url, port, tls = front
    with held_open(half_handshake(port)) as slow:
        assert_status_answers(url, cert=tls["patroni"], verify=tls["verify"])
        assert_all_closed_by_the_server(slow)
    assert_status_answers(url, cert=tls["patroni"], verify=tls["verify"])


def test_the_apache_vhost_answers_status_with_500_half_sent_requests_open_and_closes_them(front):
    url, port, tls = front
    with held_open(half_request(port, client_context(tls))) as slow:
        assert_status_answers(url, cert=tls["patroni"], verify=tls["verify"])
        assert_all_closed_by_the_server(slow)


@pytest.mark.parametrize("raw, status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414),  # Apache's limit
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),  # under it: gunicorn's, then the app's
    (b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: " + b"b" * 9000 + b"\r\n\r\n", 400),
    (b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(90)) + b"\r\n", 200),
    (b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n", 400),
    (b"POST /servers/pg/operations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400),
])
def test_what_the_apache_vhost_refuses_of_an_odd_request_is_json(front, raw, status):
    url, port, tls = front
    with client_context(tls).wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                                         server_hostname="127.0.0.1") as sock:
        sock.sendall(raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert int(head.split()[1]) == status, answer[:400]
    assert b"\r\nContent-Type: application/json" in head
    assert body.startswith(b'"OK"') if status == 200 else b'"error"' in body
