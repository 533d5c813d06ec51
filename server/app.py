"""The Flask application: DICOMweb, the JSON API and the browser UI (``web/``).

``create_app(settings, archive)`` builds it; nothing is created at import time. ``hilum web``
serves it under gunicorn (one app and one archive per worker process, built after the fork);
``hilum serve`` and the tests serve it with cheroot's threaded server (:class:`HttpServer`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import cheroot.wsgi
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from config import Settings
from server.api import register_api
from server.context import UNAUTHENTICATED, RequestContext
from server.dicomweb import register_dicomweb
from server.dicomweb.media_types import NotAcceptable
from server.dicomweb.multipart import MultipartError
from server.dicomweb.statuses import http_status_for
from server.fhir import register_fhir
from server.header_deadline import HeaderDeadlines, connection_class
from server.metrics import Metrics, mark_worker_dead
from server.monitoring import register_monitoring
from storage.archive import Archive
from storage.errors import StorageError
from storage.tiers import marking_reads
from web import register_web

log = logging.getLogger(__name__)
_access_log = logging.getLogger("hilum.http.access")


def create_app(settings: Settings, archive: Archive, metrics: Metrics | None = None) -> Flask:
    """``archive``: the app's own, which it sets up for itself. ``metrics``: the process's
    (``hilum serve`` shares it with its DIMSE SCP and worker); None: the app's own."""
    metrics = metrics or Metrics()
    # The archive is the app's own (`hilum web` opens one per worker, `hilum serve` gives it a
    # copy): through it the app counts what STOW-RS receives, and its reads from a storage tier
    # mark the study read (it comes back at the next `hilum tiers apply`).
    archive.on_ingest = metrics.ingest_observer("stow-rs")
    archive.blobs = marking_reads(archive)
    app = Flask("hilum", static_folder=None)
    app.extensions["hilum.settings"] = settings
    app.extensions["hilum.archive"] = archive
    _register_blueprints(app, settings, archive)
    register_monitoring(app, archive, metrics)  # /healthz, /readyz, /metrics
    _register_error_handlers(app)
    _configure_cors(app, settings.http.cors_allowed_origins)
    if settings.http.trusted_proxies:
        proxies = settings.http.trusted_proxies
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=proxies, x_proto=proxies, x_host=proxies, x_port=proxies,
            x_prefix=proxies,
        )  # fmt: skip

    @app.before_request
    def _request_context() -> None:
        g.request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:12]
        g.hilum_context = RequestContext(
            UNAUTHENTICATED, request.remote_addr or "", "http", request_id=g.request_id
        )

    return app


def _register_blueprints(app: Flask, settings: Settings, archive: Archive) -> None:
    """Every family of routes is registered here, one line each."""
    register_dicomweb(app, settings, archive)  # /dicomweb (QIDO, WADO, STOW, DELETE), /wado
    register_api(app, settings, archive)  # /api (AI jobs)
    register_fhir(app, settings, archive)  # /fhir: read-only FHIR R4
    register_web(app, settings, archive)  # the browser UI: /, /studies/…, /jobs, /upload


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


# The request line and headers together; more is 414 (line) or 413 (headers) from cheroot.
MAX_REQUEST_HEADER_BYTES = 64 << 10


class HttpServer:
    """The app on cheroot's threaded HTTP/1.1 server, in a background thread (``hilum serve``).

    Connections are kept alive (a viewer fetches hundreds of frames over a few of them) and
    an idle one holds no thread; request bodies reach the app as they arrive (STOW-RS reads
    them as a stream, and enforces its own size limit).
    """

    def __init__(
        self,
        app: Flask,
        host: str,
        port: int,
        threads: int = 8,
        *,
        header_timeout_s: float = 10.0,
        header_reads_per_client: int = 4,
    ) -> None:
        self._deadlines = HeaderDeadlines(header_timeout_s, header_reads_per_client)
        self._server = cheroot.wsgi.Server(
            (host, port),
            _access_logged(app),
            numthreads=threads,
            server_name="hilum",
            request_queue_size=64,
            timeout=60,  # seconds a client may stay silent inside a request
        )
        # cheroot's default, stated: no body limit here, STOW-RS answers 413 with a reason.
        self._server.max_request_body_size = 0
        # A total deadline on each request's headers (server/header_deadline.py says why),
        # and a size: cheroot's default 0 reads headers of any size into memory.
        self._server.ConnectionClass = connection_class(self._deadlines)
        self._server.max_request_header_size = MAX_REQUEST_HEADER_BYTES
        self._server.prepare()  # binds now: the port is known and taken before start()
        self._thread = threading.Thread(target=self._server.serve, name="http-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.bind_addr[1])

    def start(self) -> None:
        self._deadlines.start()
        self._thread.start()

    def stop(self) -> None:
        self._server.stop()
        self._thread.join(10)
        self._deadlines.stop()


def _access_logged(app: Flask) -> Any:
    """The app, each request logged once its response has been sent (at INFO, logger
    ``hilum.http.access``, like gunicorn's access log under ``hilum web``)."""

    def logged(environ: dict[str, Any], start_response: Any) -> Any:
        started = time.perf_counter()
        status: list[str] = []

        def start(line: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(line.split(" ", 1)[0])
            return start_response(line, headers, exc_info)

        body = app(environ, start)
        try:
            yield from body
        finally:
            if hasattr(body, "close"):
                body.close()
            _access_log.info(
                '%s "%s %s" %s %.1fms',
                environ.get("REMOTE_ADDR", "-"),
                environ.get("REQUEST_METHOD"),
                environ.get("PATH_INFO"),
                status[0] if status else "-",
                (time.perf_counter() - started) * 1000,
            )

    return logged


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
            self.cfg.set("child_exit", lambda _server, worker: mark_worker_dead(worker.pid))

        def load(self) -> Flask:
            # In each worker, after the fork.
            # Each worker's pool: as many connections as its threads can use at once.
            return create_app(settings, open_archive(settings, connections=settings.http.threads))

    def _announce(_server: object) -> None:
        print(
            f"Hilum is listening: HTTP http://{settings.server.host}:{settings.http.port}"
            f"/dicomweb ({settings.http.workers} workers); index "
            f"{settings.database_url_for_display}; blobs {settings.blob_url}",
            flush=True,
        )

    HilumWeb().run()
