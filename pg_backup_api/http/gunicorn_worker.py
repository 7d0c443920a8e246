"""The gunicorn worker class of packaging/gunicorn.conf.py: gthread, but no thread waits for a slow client.

gunicorn's gthread worker hands a connection to a thread as soon as its first byte arrives, and the
thread then reads the rest of the request head without a time limit: 32 clients that send half a
request hold the 2 x 16 threads for ever and nothing else is answered. Here the worker's main loop
reads each request head itself, without blocking, and gives the connection to a thread only once the
head is whole (or too long: gunicorn's parser then refuses it); a head not whole within HEAD_TIMEOUT
(also how long a kept-alive connection may wait idle with half a request) is closed. The body is then
read by the thread with a deadline of BODY_TIMEOUT. Connections over TLS (gunicorn's own `certfile`)
are left as gthread handles them: the shipped configuration serves plain HTTP on loopback.

Written against gunicorn's gthread worker (connections queued with `enqueue_req`, the poller, the
parser's unreader); tests/e2e/test_slow_clients.py runs it in the gunicorn the tests install.
"""

from __future__ import annotations

import logging
import resource
import selectors
import socket
import time
from collections import deque
from functools import partial
from typing import Any, Deque, Optional

from gunicorn.workers.gthread import ThreadWorker

HEAD_TIMEOUT = 10.0  # seconds for a request line and its headers, from the connection's first wait
BODY_TIMEOUT = 10.0  # seconds for a request body, once its head is whole
WRITE_TIMEOUT = 60.0  # seconds a client may leave an answer unread (an event stream included)
RECV_BYTES = 65536
FD_RESERVE = 256  # descriptors kept beside the connections: files, pipes of barman runs, inotify

log = logging.getLogger(__name__)


class DeadlineSocket:
    """The connection's socket as the parser reads it: each recv gets only what is left of the deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline: Optional[float] = None

    def recv(self, size: int) -> bytes:
        if self.deadline is None:
            return self._sock.recv(size)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client sent its request too slowly")
        self._sock.settimeout(left)
        try:
            return self._sock.recv(size)
        finally:
            self._sock.settimeout(WRITE_TIMEOUT)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _head_is_whole(head: bytes, limit: int) -> bool:
    """The request line and headers have ended (a blank line), or are longer than gunicorn accepts."""
    return b"\n\r\n" in head or b"\n\n" in head or len(head) > limit


class HeadFirstWorker(ThreadWorker):
    """gunicorn's gthread worker whose main loop reads request heads, so threads serve only whole requests."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heads: Deque[Any] = deque()  # connections whose head is being read, oldest deadline first
        cfg = self.cfg
        # What gunicorn's parser accepts at most: past that it answers the error itself.
        self.head_limit = cfg.limit_request_line + 4 + cfg.limit_request_fields * (cfg.limit_request_field_size + 2)

    def init_process(self) -> None:
        # worker_connections sockets must fit under the limit of open files, whatever systemd or the shell set.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = self.cfg.worker_connections + FD_RESERVE
        if soft != resource.RLIM_INFINITY and soft < wanted:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY
                                                            else min(wanted, hard), hard))
            except (ValueError, OSError) as exc:
                log.warning("cannot raise the limit of open files to %d: %s", wanted, exc)
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and soft < wanted:
            self.worker_connections = max(1, soft - FD_RESERVE)
            log.warning("the limit of open files (%d) allows %d connections per worker, not %d", soft,
                        self.worker_connections, self.cfg.worker_connections)
        super().init_process()

    def enqueue_req(self, conn: Any) -> None:
        if self.cfg.is_ssl or getattr(conn, "head_whole", False):
            conn.head_whole = False
            super().enqueue_req(conn)
            return
        # A kept-alive connection's parser may hold bytes already read past the last request.
        conn.head = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        if _head_is_whole(conn.head, self.head_limit):
            self._hand_over(conn)
            return
        conn.sock.setblocking(False)
        conn.head_deadline = time.monotonic() + HEAD_TIMEOUT
        self.heads.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_head_readable, conn))

    def on_head_readable(self, conn: Any, client: Any) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._drop(conn)
            return
        conn.head += data
        if _head_is_whole(conn.head, self.head_limit):
            self.poller.unregister(conn.sock)
            self.heads.remove(conn)
            self._hand_over(conn)

    def _hand_over(self, conn: Any) -> None:
        conn.head_whole = True
        conn.data_ready = True  # gthread need not wait for a first byte: the head is here
        self.enqueue_req(conn)

    def _drop(self, conn: Any) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.heads.remove(conn)
        self.nr_conns -= 1
        conn.close()

    def murder_keepalived(self, *args: Any, **kwargs: Any) -> None:
        """gthread's sweep of idle kept-alive connections, and of heads that did not arrive in time."""
        super().murder_keepalived(*args, **kwargs)
        now = time.monotonic()
        while self.heads and self.heads[0].head_deadline <= now:
            self._drop(self.heads[0])

    def handle(self, conn: Any) -> Any:
        head, conn.head = getattr(conn, "head", b""), b""
        if head:
            conn.sock.setblocking(True)
            conn.init()
            unreader = conn.parser.unreader
            if not isinstance(unreader.sock, DeadlineSocket):
                unreader.sock = DeadlineSocket(unreader.sock)
            unreader.sock.deadline = None
            unreader.unread(head)
        return super().handle(conn)

    def handle_request(self, req: Any, conn: Any) -> Any:
        sock = conn.parser.unreader.sock if conn.parser is not None else None
        conn.sock.settimeout(WRITE_TIMEOUT)
        if isinstance(sock, DeadlineSocket):
            sock.deadline = time.monotonic() + BODY_TIMEOUT
        try:
            return super().handle_request(req, conn)
        finally:
            if isinstance(sock, DeadlineSocket):
                sock.deadline = None
