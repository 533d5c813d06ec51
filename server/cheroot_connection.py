"""``hilum serve``'s HTTP connections (cheroot): each request under Hilum's deadlines
(``server/request_deadlines.py`` says why), and the process's cap on open connections.

cheroot's own hooks, through its public classes: the server's ``ConnectionClass`` (made for
each accepted connection, closed with it) and that class's ``RequestHandlerClass``, whose
``parse_request`` reads the request line and headers and ``respond`` runs the app, both in the
thread serving the request.
"""

from __future__ import annotations

import threading
from typing import Any

from cheroot.server import HTTPConnection, HTTPRequest

from server.request_deadlines import RequestDeadlines


class _OpenConnections:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self._lock = threading.Lock()

    def opened(self) -> bool:
        """Count one more; False when that one is over the limit."""
        with self._lock:
            self.count += 1
            return self.count <= self.limit

    def closed(self) -> None:
        with self._lock:
            self.count -= 1


def connection_class(deadlines: RequestDeadlines) -> type[HTTPConnection]:
    """cheroot's connection class whose requests are served under ``deadlines``, and of which
    at most ``deadlines.limits.max_connections`` are served at once (those over it are
    answered 503 and closed)."""
    connections = _OpenConnections(deadlines.limits.max_connections)

    class DeadlineRequest(HTTPRequest):
        def parse_request(self) -> None:
            conn: Any = self.conn
            if conn.over_limit:
                self.simple_response(
                    "503 Service Unavailable",
                    f"over {connections.limit} open connections (http.max_connections); "
                    "try again later",
                )
                return
            sock = conn.socket
            if not deadlines.begin(sock.shutdown, str(conn.remote_addr or "")):
                self.simple_response(
                    "503 Service Unavailable",
                    "too many requests from this address are still sending their headers "
                    "(http.header_reads_per_client)",
                )
                return
            try:
                super().parse_request()
            finally:
                if not self.ready:  # refused or cut: nothing more to serve
                    deadlines.end()

        def respond(self) -> None:
            try:
                super().respond()
            finally:
                deadlines.end()

    class DeadlineConnection(HTTPConnection):
        RequestHandlerClass = DeadlineRequest

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.over_limit = not connections.opened()
            self._counted = True

        def close(self) -> None:
            if self._counted:
                self._counted = False
                connections.closed()
            super().close()

    return DeadlineConnection
