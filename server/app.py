"""The Flask application: DICOMweb today, the JSON API and the UI beside it.

``create_app(settings, archive)`` builds it; nothing is created at import time. ``hilum web``
serves it under gunicorn (one app and one archive per worker process, built after the fork);
``hilum serve`` and the tests serve it with werkzeug's threaded server (:class:`HttpServer`).
"""

from __future__ import annotations

import logging
import threading
import uuid

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, make_server

from config import Settings
from server.api import register_api
from server.dicomweb import register_dicomweb
from server.dicomweb.media_types import NotAcceptable
from server.dicomweb.multipart import MultipartError
from server.dicomweb.statuses import http_status_for
from storage.archive import Archive
from storage.errors import StorageError

log = logging.getLogger(__name__)


def create_app(settings: Settings, archive: Archive) -> Flask:
    app = Flask("hilum", static_folder=None)
    app.extensions["hilum.settings"] = settings
    app.extensions["hilum.archive"] = archive
    _register_blueprints(app, settings, archive)
    _register_error_handlers(app)
    _configure_cors(app, settings.http.cors_allowed_origins)

    @app.before_request
    def _request_id() -> None:
        g.request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:12]

    return app


def _register_blueprints(app: Flask, settings: Settings, archive: Archive) -> None:
    """Every family of routes is registered here, one line each."""
    register_dicomweb(app, settings, archive)  # /dicomweb (QIDO, WADO, STOW, DELETE), /wado
    register_api(app, settings, archive)  # /api (AI jobs)


def _error(status: int, message: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(StorageError)
    def _storage_error(error: StorageError) -> Response:
        status = http_status_for(error)
        if status >= 500:
            log.warning("request %s %s failed: %s", request.method, request.path, error)
        return _error(status, str(error))

    @app.errorhandler(NotAcceptable)
    def _not_acceptable(error: NotAcceptable) -> Response:
        return _error(406, str(error))

    @app.errorhandler(MultipartError)
    def _bad_multipart(error: MultipartError) -> Response:
        return _error(400, f"malformed multipart body: {error}")

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        return _error(error.code or 500, error.description or error.name)


def _configure_cors(app: Flask, allowed: list[str]) -> None:
    """CORS (Fetch standard) for viewers served from another origin, e.g. OHIF."""
    if not allowed:
        return

    @app.after_request
    def _cors(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and ("*" in allowed or origin in allowed):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Expose-Headers"] = (
                "Warning, Content-Type, Content-Length, Content-Location"
            )
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                    "Access-Control-Request-Headers", "Accept, Content-Type"
                )
                response.headers["Access-Control-Max-Age"] = "600"
        return response


class HttpServer:
    """The app on werkzeug's threaded server, in a background thread (``hilum serve``)."""

    def __init__(self, app: Flask, host: str, port: int) -> None:
        self._server: BaseWSGIServer = make_server(host, port, app, threaded=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="http-server", daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_port

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def serve_with_gunicorn(settings: Settings) -> None:
    """``hilum web``: gunicorn with config/gunicorn.conf.py; blocks until it is stopped."""
    import runpy
    from pathlib import Path

    from gunicorn.app.base import BaseApplication

    import config
    from storage.archive import open_archive

    class HilumWeb(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            conf = runpy.run_path(str(Path(config.__file__).parent / "gunicorn.conf.py"))
            for name, value in conf.items():
                if name in self.cfg.settings:
                    self.cfg.set(name, value)
            self.cfg.set("bind", [f"{settings.server.host}:{settings.http.port}"])
            self.cfg.set("workers", settings.http.workers)
            self.cfg.set("threads", settings.http.threads)
            self.cfg.set("proc_name", "hilum-web")
            self.cfg.set("when_ready", _announce)

        def load(self) -> Flask:
            # In each worker, after the fork.
            return create_app(settings, open_archive(settings))

    def _announce(_server: object) -> None:
        print(
            f"Hilum is listening: HTTP http://{settings.server.host}:{settings.http.port}"
            f"/dicomweb ({settings.http.workers} workers); index "
            f"{settings.database_url_for_display}; blobs {settings.blob_url}",
            flush=True,
        )

    HilumWeb().run()
