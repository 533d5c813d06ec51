"""Clients that trickle their request headers one byte at a time (slowloris, issue 17) cannot
starve ``hilum serve``'s HTTP threads: one address holds at most its share, and every request's
headers have a total deadline. A real cheroot server, real sockets."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from config import Settings
from server.app import HttpServer, create_app
from storage.archive import Archive
from tests.conftest import free_port

REQUEST = b"GET /dicomweb/studies HTTP/1.1\r\nHost: hilum\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
PACE_S = 0.2  # the attacker's pace: one byte each


class Trickler:
    """One connection from ``source`` sending a request a byte at a time until stopped or cut."""

    def __init__(self, port: int, source: str, stop: threading.Event) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
        self.stop = stop
        self.sent = 0
        self.started = threading.Event()
        self.cut = threading.Event()  # the server answered or closed
        self.answer = b""
        threading.Thread(target=self._send, daemon=True).start()

    def _send(self) -> None:
        try:
            for byte in REQUEST:
                self.sock.sendall(bytes([byte]))
                self.sent += 1
                if self.sent == 1:
                    self.started.set()
                if self.stop.wait(PACE_S):
                    return
                self.sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    data = self.sock.recv(4096)
                    self.answer += data
                    self.cut.set()
                    return
                self.sock.setblocking(True)
        except OSError:
            self.cut.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def _server(settings: Settings, archive: Archive, **limits: float) -> HttpServer:
    app = create_app(settings, archive)
    server = HttpServer(app, "127.0.0.1", free_port(), 4, **limits)  # type: ignore[arg-type]
    server.start()
    return server


def _query(server: HttpServer) -> requests.Response:
    # The timeout is the failure bound: a starved server never answers.
    return requests.get(f"http://127.0.0.1:{server.port}/dicomweb/studies", timeout=20)


def _wait(events: list[threading.Event], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    return all(event.wait(max(0.0, deadline - time.monotonic())) for event in events)


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_one_address_trickling_twelve_connections_leaves_threads_for_others(
    backend: str, settings: Settings, archive: Archive, stop: threading.Event
) -> None:
    server = _server(settings, archive, header_timeout_s=60.0, header_reads_per_client=2)
    tricklers: list[Trickler] = []
    try:
        tricklers = [Trickler(server.port, "127.0.0.2", stop) for _ in range(12)]
        assert _wait([t.started for t in tricklers], 10)
        # Those over the address's share are answered 503 at once; two keep their threads.
        refused_deadline = time.monotonic() + 10
        while sum(t.cut.is_set() for t in tricklers) < 10 and time.monotonic() < refused_deadline:
            stop.wait(0.05)
        refused = [t for t in tricklers if t.cut.is_set()]
        assert len(refused) == 10
        assert all(t.answer.startswith(b"HTTP/1.1 503") for t in refused)

        response = _query(server)  # another address, while the two still trickle
        assert response.status_code == 200
        assert sum(not t.cut.is_set() for t in tricklers) == 2
    finally:
        stop.set()
        for trickler in tricklers:
            trickler.close()
        server.stop()


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_headers_past_their_deadline_are_cut_and_others_served(
    backend: str, settings: Settings, archive: Archive, stop: threading.Event
) -> None:
    server = _server(settings, archive, header_timeout_s=1.0, header_reads_per_client=4)
    tricklers: list[Trickler] = []
    try:
        # Twelve addresses, one connection each: three times the server's four threads.
        tricklers = [Trickler(server.port, f"127.0.0.{n}", stop) for n in range(2, 14)]
        assert _wait([t.started for t in tricklers], 10)

        response = _query(server)
        assert response.status_code == 200

        # Every trickler is cut (400, or closed) long before its 256 bytes would be sent.
        assert _wait([t.cut for t in tricklers], 20)
        assert all(t.sent < len(REQUEST) for t in tricklers)
        assert all(t.answer == b"" or t.answer.startswith(b"HTTP/1.1 400") for t in tricklers)
    finally:
        stop.set()
        for trickler in tricklers:
            trickler.close()
        server.stop()


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_request_headers_past_64_kib_are_refused(
    backend: str, settings: Settings, archive: Archive
) -> None:
    server = _server(settings, archive)
    try:
        url = f"http://127.0.0.1:{server.port}/dicomweb/studies"
        huge = requests.get(url, headers={"X-Padding": "a" * (100 << 10)}, timeout=20)
        assert huge.status_code == 413
        long_line = requests.get(url, params={"PatientID": "a" * (100 << 10)}, timeout=20)
        assert long_line.status_code == 414
        assert _query(server).status_code == 200
    finally:
        server.stop()
