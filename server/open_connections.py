"""The caps on one HTTP server process's open connections, in all (``[http] max_connections``)
and from one client address (``connections_per_client``), for ``hilum serve`` (cheroot,
``server/cheroot_connection.py``) and ``hilum web`` (gunicorn, ``server/gunicorn_worker.py``),
and the reasons both servers give in their ``503`` (issue 17).

Without the second cap, one address (a misconfigured device, a script, an attacker) could open
``max_connections`` idle connections and leave none for anyone else. A connection over either
cap is answered 503 and closed as soon as it is accepted; it is not counted, so that a flood of
refused connections takes nothing from the addresses still under their cap.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from server.request_deadlines import RequestLimits

# The 503 when one address has its share of requests sending headers (RequestDeadlines.begin).
HEADER_READS_REFUSED = (
    "too many requests from this address are still sending their headers "
    "(http.header_reads_per_client)"
)


def busy(reason: str) -> bytes:
    """A whole ``503`` answer with ``reason``, closing the connection."""
    body = reason.encode()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def refuse_now(sock: socket.socket, reason: str, *, answer: bool = True) -> None:
    """Answer a connection ``503`` with ``reason`` (one just accepted, or one whose request
    is refused before it is read) and shut it down, never blocking the thread: the answer fits
    in a connection's empty send buffer, and what the client has sent already is read first,
    so that the close is a FIN and not a reset that could discard the answer. The server then
    closes the socket at once (it is readable: end-of-file), without waiting for the client's
    request or its close. ``answer`` False: closed without one (TLS before its handshake)."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        if answer:
            sock.send(busy(reason))
        with contextlib.suppress(OSError):
            sock.recv(1 << 16)
        sock.shutdown(socket.SHUT_RDWR)


class OpenConnections:
    """The connections a server process holds open, counted in all and per client address."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._total = 0
        self._per_address: dict[str, int] = {}

    def opened(self, address: str) -> str | None:
        """A connection from ``address`` was accepted: None, and it is counted (call
        :meth:`closed` when it closes), or the reason it is refused (not counted)."""
        with self._lock:
            if self._total >= self.limits.max_connections:
                return (
                    f"over {self.limits.max_connections} open connections "
                    "(http.max_connections); try again later"
                )
            from_address = self._per_address.get(address, 0)
            if from_address >= self.limits.connections_per_client:
                return (
                    f"over {self.limits.connections_per_client} open connections from this "
                    "address (http.connections_per_client); close some or try again later"
                )
            self._total += 1
            self._per_address[address] = from_address + 1
        return None

    def closed(self, address: str) -> None:
        """A connection that :meth:`opened` counted has closed."""
        with self._lock:
            self._total -= 1
            left = self._per_address.get(address, 1) - 1
            if left:
                self._per_address[address] = left
            else:
                self._per_address.pop(address, None)

    def count(self, address: str | None = None) -> int:
        """Open connections, in all or from ``address``."""
        with self._lock:
            return self._total if address is None else self._per_address.get(address, 0)
