"""Deadlines on every HTTP request, for ``hilum serve`` (cheroot) and ``hilum web`` (gunicorn):
its line and headers, its body, and each piece of its response (issue 17).

Both servers give a request one thread, and that thread blocks in a socket read or write for as
long as the client makes it: cheroot renews its per-read timeout with every byte, and gunicorn's
gthread workers read and write without any timeout once a request has begun. A client sending
one byte a second (slowloris), a body that never ends, or a response nobody reads would each
hold a thread for good, and ``[http] threads`` such clients hold them all.

So each request is registered, by the thread serving it, in three phases:

- **headers**: from the first byte until the app is called, at most ``header_timeout_s`` in
  all; one client address may have at most ``header_reads_per_client`` requests in this phase
  (another one waits up to two seconds for one of them to finish its headers, as a browser's
  parallel requests do at once, and is otherwise answered 503, so that one address cannot take
  every thread);
- **body**: while the app reads the request body, ``body_timeout_s`` plus one second per
  ``body_min_bytes_per_s`` bytes read so far (a slow link sending a large STOW-RS is never
  cut; a trickle is);
- **response**: once the app has started its answer, each piece must be taken by the client
  within ``send_timeout_s`` of the previous one.

One watchdog thread ends whatever is late by shutting the socket down: the blocked read sees
end-of-file (the server answers 400 or closes; a STOW-RS body cut short is a 400 for its
multipart), a blocked write fails; the thread is free again. The servers' own hooks (cheroot's
request class, gunicorn's worker class) say when a request begins and ends; :func:`guarded`,
the WSGI middleware, moves it from phase to phase in the same thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

_TICK_S = 0.1  # how late past its deadline a request may be cut
# How long a request over its address's share of header reads waits for a slot before its 503.
_SHARE_WAIT_S = 2.0

HEADERS, BODY, RESPONSE = "headers", "body", "response"


@dataclass(frozen=True)
class RequestLimits:
    """``[http]``'s limits on one request's time and on connections (docs/configuration.md)."""

    header_timeout_s: float = 10.0
    header_reads_per_client: int = 4
    body_timeout_s: float = 60.0
    body_min_bytes_per_s: int = 1024
    send_timeout_s: float = 60.0
    max_connections: int = 1000
    connections_per_client: int = 256

    @classmethod
    def from_settings(cls, http: Any) -> RequestLimits:
        return cls(
            header_timeout_s=http.header_timeout_s,
            header_reads_per_client=http.header_reads_per_client,
            body_timeout_s=http.body_timeout_s,
            body_min_bytes_per_s=http.body_min_bytes_per_s,
            send_timeout_s=http.send_timeout_s,
            max_connections=http.max_connections,
            connections_per_client=http.connections_per_client,
        )


@dataclass
class _Request:
    cut: Callable[[int], None]  # shuts the connection down (socket.SHUT_RD or SHUT_RDWR)
    address: str
    phase: str
    deadline: float
    started: float
    counted: bool = True  # in its address's share while in HEADERS
    received: int = 0


class RequestDeadlines:
    """The requests being served, keyed by the thread serving each, and their deadlines."""

    def __init__(self, limits: RequestLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._share_freed = threading.Condition(self._lock)
        self._requests: dict[int, _Request] = {}
        self._sending_headers: dict[str, int] = {}  # client address -> requests in HEADERS
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="http-deadlines", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(5)

    # -- called by the server's hooks, in the thread serving the request ---------------------

    def begin(self, cut: Callable[[int], None], address: str, *, counted: bool = True) -> bool:
        """A request's first bytes are about to be read by this thread; False (and nothing
        registered) when ``address`` already has its share of requests sending headers.
        ``counted=False``: under the header deadline, but not in the address's share."""
        with self._lock:
            if counted:
                # A browser's burst of parallel requests (six connections) parses its headers
                # in microseconds: one over the share waits a moment for a slot; a slow
                # sender's requests hold theirs, and the next one is refused after that moment.
                if not self._share_freed.wait_for(
                    lambda: (
                        self._sending_headers.get(address, 0) < self.limits.header_reads_per_client
                    ),
                    _SHARE_WAIT_S,
                ):
                    return False
                self._sending_headers[address] = self._sending_headers.get(address, 0) + 1
            now = self._clock()
            self._requests[threading.get_ident()] = _Request(
                cut, address, HEADERS, now + self.limits.header_timeout_s, now, counted=counted
            )
        return True

    def end(self) -> None:
        """This thread is done with its request (answered, refused or cut)."""
        with self._lock:
            request = self._requests.pop(threading.get_ident(), None)
            if request is not None and request.phase == HEADERS:
                self._headers_done(request)

    # -- called by the middleware ---------------------------------------------------------

    def body_begins(self) -> None:
        now = self._clock()
        with self._lock:
            request = self._requests.get(threading.get_ident())
            if request is None or request.phase != HEADERS:
                return
            self._headers_done(request)
            request.phase, request.started = BODY, now
            request.deadline = now + self.limits.body_timeout_s

    def body_read(self, n: int) -> None:
        with self._lock:
            request = self._requests.get(threading.get_ident())
            if request is None or request.phase != BODY:
                return
            request.received += n
            request.deadline = (
                request.started
                + self.limits.body_timeout_s
                + request.received / self.limits.body_min_bytes_per_s
            )

    def sending(self) -> None:
        """The app has started its answer, or the client took the previous piece of it."""
        now = self._clock()
        with self._lock:
            request = self._requests.get(threading.get_ident())
            if request is None:
                return
            if request.phase == HEADERS:
                self._headers_done(request)
            request.phase = RESPONSE
            request.deadline = now + self.limits.send_timeout_s

    # -- the watchdog -----------------------------------------------------------------------

    def _headers_done(self, request: _Request) -> None:
        if not request.counted:
            return
        request.counted = False
        left = self._sending_headers.get(request.address, 1) - 1
        if left:
            self._sending_headers[request.address] = left
        else:
            self._sending_headers.pop(request.address, None)
        self._share_freed.notify_all()

    def _watch(self) -> None:
        while not self._stopped.wait(_TICK_S):
            now = self._clock()
            late: list[tuple[Callable[[int], None], int]] = []
            with self._lock:
                for request in self._requests.values():
                    if request.deadline <= now:
                        # Reading: end-of-file for the blocked read; sending: the write fails.
                        how = socket.SHUT_RDWR if request.phase == RESPONSE else socket.SHUT_RD
                        late.append((request.cut, how))
                        request.deadline = float("inf")  # cut once; end() unregisters it
            for cut, how in late:
                with contextlib.suppress(OSError):
                    cut(how)


class _Input:
    """``wsgi.input`` whose reads move the request's body deadline."""

    def __init__(self, stream: Any, deadlines: RequestDeadlines) -> None:
        self._stream = stream
        self._deadlines = deadlines

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size) if size is not None else self._stream.read()
        self._deadlines.body_read(len(data))
        return bytes(data)

    def readline(self, size: int = -1) -> bytes:
        data = self._stream.readline(size) if size is not None else self._stream.readline()
        self._deadlines.body_read(len(data))
        return bytes(data)

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


def guarded(app: Any, deadlines: RequestDeadlines) -> Any:
    """The WSGI ``app`` with its request's body and response phases under ``deadlines``."""

    def guarded_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        deadlines.body_begins()
        environ["wsgi.input"] = _Input(environ["wsgi.input"], deadlines)

        def start(status: str, headers: Any, exc_info: Any = None) -> Any:
            deadlines.sending()
            return start_response(status, headers, exc_info)

        return _Response(app(environ, start), deadlines)

    return guarded_app


class _Response:
    """The app's response iterable; each piece asked for renews the send deadline (the server
    asks for the next once it has written the previous one)."""

    def __init__(self, body: Iterable[bytes], deadlines: RequestDeadlines) -> None:
        self._body = body
        self._deadlines = deadlines

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            self._deadlines.sending()
            yield chunk

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()
