"""Request bodies within their limit (server/request_body.py), on the real ``hilum serve``
HTTP server (cheroot, in this process) with an app of three routes: a body announced by its
Content-Length or sent chunked is read whole up to the limit, and refused with 413 and the
reason one byte past it. Both servers with Hilum's own app: tests/server/test_hostile_http.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from flask import Flask, jsonify, request

from server.app import HttpServer
from server.request_body import BoundedRequest, limit_body
from tests.conftest import free_port

LIMIT = 1000


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = Flask("bodies")
    app.request_class = BoundedRequest
    app.config["MAX_CONTENT_LENGTH"] = LIMIT

    @app.post("/data")
    def data() -> object:
        return jsonify(length=len(request.get_data()))

    @app.post("/form")
    def form() -> object:
        return jsonify(dict(request.form))

    @app.post("/own-limit")
    def own_limit() -> object:
        limit_body(2 * LIMIT, "http.stow_max_bytes")
        return jsonify(length=len(request.stream.read()))

    @app.errorhandler(413)
    def too_large(error: Exception) -> object:
        return jsonify(error=getattr(error, "description", "")), 413

    server = HttpServer(app, "127.0.0.1", free_port(), threads=2)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def _chunked(body: bytes) -> Iterator[bytes]:
    return iter([body[i : i + 300] for i in range(0, len(body), 300)])


@pytest.mark.parametrize("sent", ["sized", "chunked"])
def test_a_body_up_to_the_limit_is_read_whole(base_url: str, sent: str) -> None:
    for size in (0, 1, LIMIT - 1, LIMIT):
        body = b"x" * size
        data = body if sent == "sized" else _chunked(body)
        # The timeout is the failure bound: a read past the body's end never returns.
        response = requests.post(f"{base_url}/data", data=data, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json() == {"length": size}


@pytest.mark.parametrize("sent", ["sized", "chunked"])
def test_a_body_past_the_limit_is_413_with_the_reason(base_url: str, sent: str) -> None:
    for size in (LIMIT + 1, 20 * LIMIT):
        body = b"x" * size
        data = body if sent == "sized" else _chunked(body)
        response = requests.post(f"{base_url}/data", data=data, timeout=30)
        assert response.status_code == 413, response.text
        assert f"larger than {LIMIT} bytes (http.body_max_bytes)" in response.json()["error"]


def test_a_form_is_parsed(base_url: str) -> None:
    response = requests.post(f"{base_url}/form", data={"reviewer": "Dr Jane Doe"}, timeout=30)
    assert response.json() == {"reviewer": "Dr Jane Doe"}


@pytest.mark.parametrize("sent", ["sized", "chunked"])
def test_a_route_sets_its_own_limit_and_names_its_key(base_url: str, sent: str) -> None:
    within = b"x" * (2 * LIMIT)
    data = within if sent == "sized" else _chunked(within)
    response = requests.post(f"{base_url}/own-limit", data=data, timeout=30)
    assert response.json() == {"length": 2 * LIMIT}
    over = within + b"x"
    response = requests.post(
        f"{base_url}/own-limit", data=over if sent == "sized" else _chunked(over), timeout=30
    )
    assert response.status_code == 413
    assert f"larger than {2 * LIMIT} bytes (http.stow_max_bytes)" in response.json()["error"]
