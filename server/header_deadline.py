"""A deadline on the request line and headers of every HTTP request served by cheroot, and a
cap on how many of them one client address may have in that state at once.

cheroot hands a connection to one of its worker threads as soon as its first byte arrives,
and reads the headers there with a per-read timeout that every byte renews: a client sending
one byte a second holds a thread for as long as it likes, and ``[http] threads`` such clients
hold them all (slowloris). cheroot has no total deadline of its own, so Hilum's connections
(``HTTPServer.ConnectionClass``, its request handler ``HTTPConnection.RequestHandlerClass``)
register each request while its headers are read; one watchdog thread shuts the read side of
any connection past its deadline (the blocked read ends, cheroot answers 400 and closes), and
a client address over its share is answered 503 at once instead of being given the thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from cheroot.server import HTTPConnection, HTTPRequest

_TICK_S = 0.1  # how late past its deadline a connection may be cut


class HeaderDeadlines:
    """The requests whose headers are being read: when each must be done, and by whom."""

    def __init__(
        self, timeout_s: float, per_client: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.timeout_s = timeout_s
        self.per_client = per_client
        self._clock = clock
        self._lock = threading.Lock()
        self._reading: dict[int, tuple[float, socket.socket]] = {}  # id(request) -> ...
        self._per_address: dict[str, int] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="http-header-deadlines", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def begin(self, key: int, sock: socket.socket, address: str) -> bool:
        """Register a request about to read its headers; False when ``address`` already has
        its share reading theirs."""
        with self._lock:
            if self._per_address.get(address, 0) >= self.per_client:
                return False
            self._per_address[address] = self._per_address.get(address, 0) + 1
            self._reading[key] = (self._clock() + self.timeout_s, sock)
        return True

    def end(self, key: int, address: str) -> None:
        with self._lock:
            self._reading.pop(key, None)
            left = self._per_address.get(address, 1) - 1
            if left:
                self._per_address[address] = left
            else:
                self._per_address.pop(address, None)

    def _watch(self) -> None:
        while not self._stopped.wait(_TICK_S):
            now = self._clock()
            with self._lock:
                late = [
                    (key, sock)
                    for key, (deadline, sock) in self._reading.items()
                    if deadline <= now
                ]
                for key, _sock in late:
                    del self._reading[key]
            for _key, sock in late:
                # The blocked read returns end-of-file; cheroot answers 400 and closes.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)


def connection_class(deadlines: HeaderDeadlines) -> type[HTTPConnection]:
    """cheroot's connection class whose requests read their headers under ``deadlines``."""

    class DeadlineRequest(HTTPRequest):
        def parse_request(self) -> None:
            conn: Any = self.conn
            address = str(conn.remote_addr or "")
            if not deadlines.begin(id(self), conn.socket, address):
                self.simple_response(
                    "503 Service Unavailable",
                    "too many requests from this address are still sending their headers",
                )
                return
            try:
                super().parse_request()
            finally:
                deadlines.end(id(self), address)

    class DeadlineConnection(HTTPConnection):
        RequestHandlerClass = DeadlineRequest

    return DeadlineConnection
