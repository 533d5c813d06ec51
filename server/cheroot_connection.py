"""``hilum serve``'s HTTP connections (cheroot): each request under Hilum's deadlines
(``server/request_deadlines.py`` says why), and the process's caps on open connections, in all
and per client address (``server/open_connections.py``).

cheroot's own hooks, through its public classes: the server's ``ConnectionClass`` (made for
each accepted connection, closed with it) and that class's ``RequestHandlerClass``, whose
``parse_request`` reads the request line and headers and ``respond`` runs the app, both in the
thread serving the request.
"""

from __future__ import annotations

from typing import Any

from cheroot.server import HTTPConnection, HTTPRequest

from server.open_connections import HEADER_READS_REFUSED, OpenConnections, refuse_now
from server.request_deadlines import RequestDeadlines


def connection_class(deadlines: RequestDeadlines) -> type[HTTPConnection]:
    """cheroot's connection class whose requests are served under ``deadlines``, and of which
    at most ``deadlines.limits.max_connections`` are open at once, ``connections_per_client``
    from one address (one over either is answered 503 as it is accepted and closed)."""
    connections = OpenConnections(deadlines.limits)

    class DeadlineRequest(HTTPRequest):
        def parse_request(self) -> None:
            conn: Any = self.conn
            if conn.refusal is not None:
                return  # answered and shut down as it was accepted: closed now
            sock = conn.socket
            if not deadlines.begin(sock.shutdown, str(conn.remote_addr or "")):
                self.simple_response("503 Service Unavailable", HEADER_READS_REFUSED)
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

        def __init__(self, server: Any, sock: Any, *args: Any) -> None:
            super().__init__(server, sock, *args)
            # cheroot sets remote_addr once this returns; the socket knows it already.
            self._address = _peer_address(sock)
            self.refusal = connections.opened(self._address)
            self._counted = self.refusal is None
            if self.refusal is not None:
                # Answered now, in the accepting thread, and shut down: cheroot then finds
                # the socket at its end and closes it, without waiting for a request that an
                # idle client never sends (its connection would stay open, uncounted).
                refuse_now(sock, self.refusal)

        def close(self) -> None:
            if self._counted:
                self._counted = False
                connections.closed(self._address)
            super().close()

    return DeadlineConnection


def _peer_address(sock: Any) -> str:
    try:
        peer = sock.getpeername()
    except OSError:  # already reset by the client: counted under no address
        return ""
    return str(peer[0]) if isinstance(peer, tuple) else ""
