"""CORS (the Fetch standard, "CORS protocol"): which other origins' browser pages may call
Hilum's HTTP API, e.g. a viewer served from another host.

``[http] cors_allowed_origins`` lists them. An origin listed by name may read, store and delete
(as its user's credentials allow), with credentials; the wildcard ``"*"`` lets any page read
only (GET and HEAD), never with credentials, so that no web page a user happens to open can
store or delete through the user's browser. ``Origin: null`` (sandboxed frames, ``file:``
pages, redirects across origins) is nobody's origin and never matches, even when listed.

A refused preflight gets no CORS headers at all (the browser then refuses the request);
Hilum's own pages are same-origin and need none.
"""

from __future__ import annotations

from flask import Flask, Response, request

READ_ONLY = ("GET", "HEAD")
# What a listed origin may use: reading, STOW-RS and the JSON API's POSTs, DELETE.
LISTED = ("GET", "HEAD", "POST", "PUT", "DELETE")
EXPOSED_HEADERS = "Warning, Content-Type, Content-Length, Content-Location, Location"
PREFLIGHT_MAX_AGE_S = 600


def cors_methods(origin: str | None, allowed: list[str]) -> tuple[str, ...]:
    """The methods a page of ``origin`` may use with ``allowed`` configured; () for none."""
    if not origin or origin == "null":
        return ()
    if origin in allowed:
        return LISTED
    if "*" in allowed:
        return READ_ONLY
    return ()


def configure_cors(app: Flask, allowed: list[str]) -> None:
    if not allowed:
        return

    @app.after_request
    def _cors(response: Response) -> Response:
        # The answer depends on the Origin header: caches must keep one per origin.
        response.vary.add("Origin")
        origin = request.headers.get("Origin")
        methods = cors_methods(origin, allowed)
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
