"""CORS (the Fetch standard, "CORS protocol"): which other origins' browser pages may call
Hilum's HTTP API, e.g. a viewer served from another host.

The index lists them (``hilum cors``, ``/api/admin/cors-origins``; ``[http]
cors_allowed_origins`` seeds it on first start), read at most every ``ORIGINS_TTL_S`` seconds,
so a change applies within that time in every process, without a restart. An origin listed by
name may read, store and delete (as its user's credentials allow), with credentials; the
wildcard ``"*"`` lets any page read only (GET and HEAD), never with credentials, so that no web
page a user happens to open can store or delete through the user's browser, and only while
authentication is off: with ``[auth]`` on, only listed origins get CORS at all. ``Origin:
null`` (sandboxed frames, ``file:`` pages, redirects across origins) is nobody's origin and never
matches, even when listed.

A refused preflight gets no CORS headers at all (the browser then refuses the request);
Hilum's own pages are same-origin and need none.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from flask import Flask, Response, request

from storage.cors_origins import list_cors_origins
from storage.errors import StorageUnavailable
from storage.index.database import Index

READ_ONLY = ("GET", "HEAD")
# What a listed origin may use: reading, STOW-RS and the JSON API's POSTs, DELETE.
LISTED = ("GET", "HEAD", "POST", "PUT", "DELETE")
EXPOSED_HEADERS = "Warning, Content-Type, Content-Length, Content-Location, Location"
PREFLIGHT_MAX_AGE_S = 600
ORIGINS_TTL_S = 10.0


def cors_methods(
    origin: str | None, allowed: list[str], *, wildcard: bool = True
) -> tuple[str, ...]:
    """The methods a page of ``origin`` may use with ``allowed`` listed; () for none.
    ``wildcard``: whether a listed ``"*"`` counts (not once authentication is on)."""
    if not origin or origin == "null":
        return ()
    if origin in allowed:
        return LISTED
    if wildcard and "*" in allowed:
        return READ_ONLY
    return ()


class StoredOrigins:
    """The listed origins, read from the index at most every ``ttl_s`` seconds; while the index
    cannot be reached, the last list read (none before the first read)."""

    def __init__(
        self,
        index: Index,
        ttl_s: float = ORIGINS_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index, self.ttl_s, self.clock = index, ttl_s, clock
        self._origins: list[str] = []
        self._read_at: float | None = None

    def __call__(self) -> list[str]:
        now = self.clock()
        if self._read_at is None or now - self._read_at >= self.ttl_s:
            # The index unreachable: the last list stands, tried again after ttl_s.
            with contextlib.suppress(StorageUnavailable):
                self._origins = list_cors_origins(self.index)
            self._read_at = now
        return self._origins


def configure_cors(app: Flask, origins: Callable[[], list[str]], *, wildcard: bool) -> None:
    """``origins``: the listed origins now; ``wildcard``: whether "*" counts (auth off)."""

    @app.after_request
    def _cors(response: Response) -> Response:
        allowed = origins()
        if not allowed:
            return response
        # The answer depends on the Origin header: caches must keep one per origin.
        response.vary.add("Origin")
        origin = request.headers.get("Origin")
        methods = cors_methods(origin, allowed, wildcard=wildcard)
        preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in (
            request.headers
        )
        wanted = (
            request.headers["Access-Control-Request-Method"].strip().upper()
            if preflight
            else request.method
        )
        if wanted not in methods:
            return response
        listed = origin in allowed
        response.headers["Access-Control-Allow-Origin"] = origin if listed else "*"
        if listed:
            response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if preflight:
            response.headers["Access-Control-Allow-Methods"] = ", ".join(methods)
            response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Accept, Content-Type"
            )
            response.headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_S)
        return response
