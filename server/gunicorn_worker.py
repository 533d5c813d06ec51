"""``hilum web``'s gunicorn worker: gthread, each request under Hilum's deadlines
(``server/request_deadlines.py`` says why: gthread reads and writes without a timeout once a
request has begun).

A worker class is gunicorn's documented extension point (``worker_class``, a subclass of
``gunicorn.workers.base.Worker``); this one overrides the public methods ``init_process``,
``load_wsgi`` and ``handle`` (which serves one request of a connection in a pool thread) and
calls the originals. The cap on open connections is gunicorn's own ``worker_connections``.
"""

from __future__ import annotations

import contextlib
import select
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from server.request_deadlines import RequestDeadlines, RequestLimits, guarded

_REASON = b"too many requests from this address are still sending their headers " + (
    b"(http.header_reads_per_client)"
)
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    + b"Content-Length: %d\r\n\r\n" % len(_REASON)
    + _REASON
)


class DeadlineThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gthread with :class:`RequestDeadlines`; the limits come from the application object
    (``server.app.serve_with_gunicorn``'s, attribute ``request_limits``)."""

    def init_process(self) -> None:
        limits: RequestLimits = getattr(self.app, "request_limits", RequestLimits())
        self.deadlines = RequestDeadlines(limits)
        self.deadlines.start()
        super().init_process()  # runs the worker until it stops

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = guarded(self.wsgi, self.deadlines)

    def handle(self, conn: Any) -> Any:
        client = conn.client
        address = str(client[0] if isinstance(client, tuple) else client)
        # A connection dispatched before its first byte arrived waits here for it (gunicorn
        # defers it to its poller after a few seconds): under the header deadline, but not in
        # the address's share until its bytes are there, so that a browser opening its six
        # connections at once is not refused.
        counted = bool(conn.initialized or conn.data_ready or _readable(conn.sock))

        def cut(how: int) -> None:
            conn.sock.shutdown(how)

        if not self.deadlines.begin(cut, address, counted=counted):
            if not self.cfg.is_ssl:
                with contextlib.suppress(OSError):
                    conn.sock.sendall(_BUSY)
            return False  # gunicorn closes the connection
        try:
            return super().handle(conn)
        finally:
            self.deadlines.end()


def _readable(sock: Any) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(readable)
