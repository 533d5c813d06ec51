"""``hilum web``'s gunicorn worker: gthread, each request under Hilum's deadlines
(``server/request_deadlines.py`` says why: gthread reads and writes without a timeout once a
request has begun), and the worker's caps on open connections, in all and per client address
(``server/open_connections.py``).

A worker class is gunicorn's documented extension point (``worker_class``, a subclass of
``gunicorn.workers.base.Worker``); this one overrides the public methods ``init_process``,
``load_wsgi``, ``accept`` (which takes a connection from the listening socket, in the worker's
main thread) and ``handle`` (which serves one request of a connection in a pool thread), and
calls the originals but for ``accept``, which gthread's ``ThreadWorker`` has no other hook in.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

from server.open_connections import (
    HEADER_READS_REFUSED,
    OpenConnections,
    refuse_now,
)
from server.request_deadlines import RequestDeadlines, RequestLimits, guarded


class DeadlineThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gthread with :class:`RequestDeadlines` and :class:`OpenConnections`; the limits come
    from the application object (``server.app.serve_with_gunicorn``'s, attribute
    ``request_limits``). gunicorn's own cap (``worker_connections``) must stay above
    ``max_connections``, so that this worker goes on accepting the connections it refuses."""

    def init_process(self) -> None:
        limits: RequestLimits = getattr(self.app, "request_limits", RequestLimits())
        self.deadlines = RequestDeadlines(limits)
        self.connections = OpenConnections(limits)
        self.deadlines.start()
        super().init_process()  # runs the worker until it stops

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = guarded(self.wsgi, self.deadlines)

    def accept(self, listener: Any) -> None:
        # ThreadWorker.accept, with the caps: a refused connection is answered here, at once
        # and without waiting on the client, so that a flood of them holds no pool thread.
        try:
            sock, client = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        address = _address(client)
        refusal = self.connections.opened(address)
        if refusal is not None:
            # Over TLS without an answer: that would need the handshake first.
            refuse_now(sock, refusal, answer=not self.cfg.is_ssl)
            sock.close()
            return
        self.nr_conns += 1
        sock.setblocking(True)
        closed = partial(self.connections.closed, address)
        self.enqueue_req(_CountedConn(self.cfg, sock, client, listener.getsockname(), closed))

    def handle(self, conn: Any) -> Any:
        address = _address(conn.client)
        # A connection dispatched before its first byte arrived waits here for it (gunicorn
        # defers it to its poller after a few seconds): under the header deadline, but not in
        # the address's share until its bytes are there, so that a browser opening its six
        # connections at once is not refused.
        # A new connection's first byte gets a moment to arrive (the thread would block in
        # gunicorn's read for it anyway): one that sends at once is counted even when the
        # worker dispatched it first, as happens on a busy host.
        counted = bool(
            conn.initialized or conn.data_ready or _readable(conn.sock, FIRST_BYTE_WAIT_S)
        )

        def cut(how: int) -> None:
            conn.sock.shutdown(how)

        if not self.deadlines.begin(cut, address, counted=counted):
            # Answered and shut down at once, not lingered on: a flood of refused requests
            # must hold no pool thread. Over TLS without an answer (no handshake yet).
            refuse_now(conn.sock, HEADER_READS_REFUSED, answer=not self.cfg.is_ssl)
            conn.lingered = True
            return False  # gunicorn closes the connection
        try:
            keep = super().handle(conn)
        finally:
            self.deadlines.end()
        if keep is False:
            _linger(conn)
        return keep


class _CountedConn(TConn):  # type: ignore[misc]
    """gthread's connection, which says when it closes (gunicorn closes every connection
    through ``close``: answered, expired while kept alive or idle, or broken), and which is
    closed at once where a pool thread has lingered on it already (:func:`_linger`)."""

    def __init__(self, cfg: Any, sock: Any, client: Any, server: Any, closed: Callable[[], None]):
        super().__init__(cfg, sock, client, server)
        self._on_close: Callable[[], None] | None = closed
        self.lingered = False

    def close(self, graceful: bool = False) -> None:
        on_close, self._on_close = self._on_close, None
        try:
            super().close(graceful and not self.lingered)
        finally:
            if on_close is not None:
                on_close()


def _linger(conn: Any) -> None:
    """The graceful close of RFC 9112 9.6, in the pool thread that served the connection:
    our side shut for writing, then what the client still sends read and dropped until it
    closes too (at most :data:`LINGER_S` and :data:`LINGER_MAX_BYTES`), so that a request body
    left unread does not make the kernel reset the connection and discard the answer.
    gunicorn would do the same in the worker's main thread (``close(graceful=True)``), where a
    client that never closes would hold every other client's accept and keep-alive for the
    whole wait."""
    conn.lingered = True
    sock = conn.sock
    with contextlib.suppress(OSError):  # a timeout, a reset or a socket closed already
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_S
        drained = 0
        while drained < LINGER_MAX_BYTES and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            data = sock.recv(1 << 16)
            if not data:
                return
            drained += len(data)


# How long a new connection's first byte is awaited before it is read uncounted (a browser's
# preconnect sends nothing for seconds; an attacker's trickle starts at once).
FIRST_BYTE_WAIT_S = 1.0
# gunicorn's own bounds on a graceful close (gunicorn.util.close_graceful).
LINGER_S = 2.0
LINGER_MAX_BYTES = 1 << 16


def _address(client: Any) -> str:
    return str(client[0] if isinstance(client, tuple) else client)


def _readable(sock: Any, timeout_s: float) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], timeout_s)
    except (OSError, ValueError):
        return False
    return bool(readable)
