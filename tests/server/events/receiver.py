"""A webhook receiver for the tests: a real HTTP server in a thread that checks each request's
signature, can refuse requests, and can go down and come back on the same port."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from server.events.webhooks import SIGNATURE_HEADER, verify


class Receiver:
    def __init__(self, port: int, secret: str) -> None:
        self.port = port
        self.secret = secret
        self.url = f"http://127.0.0.1:{port}/hook"
        self.lock = threading.Lock()
        self.accepted: list[dict[str, Any]] = []  # bodies taken (2xx), in arrival order
        self.requests = 0
        self.refuse_next = 0  # answer this many requests with 503
        self.refuse_types: set[str] = set()  # answer events of these types with 500
        self.bad_signatures = 0
        self.in_flight = 0
        self.most_in_flight = 0  # requests served at once, at most
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def accepted_ids(self) -> list[int]:
        with self.lock:
            return [body["id"] for body in self.accepted]

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                event = json.loads(body)
                with receiver.lock:
                    receiver.in_flight += 1
                    receiver.most_in_flight = max(receiver.most_in_flight, receiver.in_flight)
                # A receiver that takes a moment to answer: a second sender delivering at the
                # same time would overlap it.
                threading.Event().wait(0.002)
                with receiver.lock:
                    receiver.in_flight -= 1
                    receiver.requests += 1
                    if not verify(receiver.secret, self.headers[SIGNATURE_HEADER], body):
                        receiver.bad_signatures += 1
                        status = 401
                    elif receiver.refuse_next > 0:
                        receiver.refuse_next -= 1
                        status = 503
                    elif event["type"] in receiver.refuse_types:
                        status = 500
                    else:
                        assert self.headers["Hilum-Event-Id"] == str(event["id"])
                        receiver.accepted.append(event)
                        status = 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                # One request per connection: once down, no kept-alive connection still serves.
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def down(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None
