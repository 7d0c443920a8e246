"""The development server of `pg-backup-api serve`: werkzeug's, bounded against slow and broken clients.

Each connection gets a thread, as in werkzeug's threaded server, but at most MAX_CONNECTIONS at once
(beyond, a JSON 503 and the connection closed: the process never runs out of file descriptors), and
each request must arrive in time: its line and headers within HEAD_TIMEOUT (also the longest a kept-
alive connection waits idle), its body within BODY_TIMEOUT. The errors the server answers itself (a
request line or header too long, too many headers, a malformed request line) are JSON like the
application's, never HTML.
"""

from __future__ import annotations

import io
import json
import logging
import resource
import socket
import threading
import time
from typing import Any, Optional, Tuple

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

log = logging.getLogger(__name__)

HEAD_TIMEOUT = 10.0  # seconds for a request line and its headers
BODY_TIMEOUT = 10.0  # seconds for a request body, from the end of its headers
DRAIN_TIMEOUT = 1.0  # seconds an unread rest of a body is read once the answer has started
WRITE_TIMEOUT = 60.0  # seconds a client may leave an answer unread (an event stream included)
MAX_CONNECTIONS = 1000
FD_RESERVE = 256  # descriptors kept for the application: files, pipes of barman runs, inotify
BUSY_BODY = json.dumps({"error": "the development server has too many connections open; retry later"}).encode()


class DeadlineReader(io.RawIOBase):
    """A connection's bytes, each read given only what is left of the current deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline: Optional[float] = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the client sent its request too slowly")
            self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(WRITE_TIMEOUT)


class BoundedRequestHandler(WSGIRequestHandler):
    """werkzeug's handler with a deadline on each request and JSON for the errors it answers itself."""

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by one that keeps the deadline
        self.connection.settimeout(WRITE_TIMEOUT)
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.deadline = time.monotonic() + HEAD_TIMEOUT
        super().handle_one_request()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        coding = self.headers.get("Transfer-Encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            # werkzeug would read no body at all: the client is told rather than answered "empty".
            self.send_error(501, None, f"Transfer-Encoding {coding.strip()[:80]!r} is not supported; send "
                                       "the body with Content-Length or Transfer-Encoding: chunked")
            return False
        self.reader.deadline = time.monotonic() + BODY_TIMEOUT
        return True

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        super().send_response(code, message)
        # Once the answer starts, what is left of a body is only read to be thrown away (werkzeug reads
        # until the client closes): not for longer than DRAIN_TIMEOUT.
        deadline = self.reader.deadline
        self.reader.deadline = min(deadline or float("inf"), time.monotonic() + DRAIN_TIMEOUT)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's error answer, as `{"error": ...}` (its own is an HTML page)."""
        short = self.responses.get(code, ("error", ""))[0]
        text = "; ".join(part for part in (message or short, explain) if part)
        self.log_error("code %d, message %s", code, text)
        body = json.dumps({"error": text[:400]}).encode()
        if self.request_version == "HTTP/0.9":  # a request line that could not be read: answer with a status line
            self.request_version = "HTTP/1.0"
        self.send_response(code, message)
        self.send_header("Connection", "close")
        self.close_connection = True
        has_body = code >= 200 and code not in (204, 304) and self.command != "HEAD"
        if has_body:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if has_body:
            self.wfile.write(body)


class BoundedServer(ThreadedWSGIServer):
    """werkzeug's threaded server serving at most *max_connections* connections at once."""

    def __init__(self, host: str, port: int, app: Any, max_connections: int) -> None:
        super().__init__(host, port, app, handler=BoundedRequestHandler)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
                f"{len(BUSY_BODY)}\r\nRetry-After: 5\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)
            request.send(head + BUSY_BODY)
        except OSError:
            pass
        self.shutdown_request(request)


def connection_limit() -> Tuple[int, int]:
    """(connections served at once, descriptors this process may open): the soft limit of descriptors is
    raised towards the hard one so that MAX_CONNECTIONS fit with FD_RESERVE to spare."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_CONNECTIONS + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the limit of open files to %d: %s", raised, exc)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS, soft
    return max(1, min(MAX_CONNECTIONS, soft - FD_RESERVE)), soft


def serve(host: str, port: int, app: Any) -> None:
    """Serve *app* on host:port until interrupted."""
    connections, files = connection_limit()
    server = BoundedServer(host, port, app, connections)
    log.info("development server on http://%s:%d: at most %d connections (open files limit %d), request "
             "headers within %.0f s, bodies within %.0f s", host, port, connections, files, HEAD_TIMEOUT,
             BODY_TIMEOUT)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
