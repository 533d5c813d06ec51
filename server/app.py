"""The Flask application: DICOMweb, the JSON API and the browser UI (``web/``).

``create_app(settings, archive)`` builds it; nothing is created at import time. ``hilum web``
serves it under gunicorn (one app and one archive per worker process, built after the fork);
``hilum serve`` and the tests serve it with cheroot's threaded server (:class:`HttpServer`).
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import re
import ssl
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import cheroot.wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter
from flask import Flask, Response, g, jsonify, redirect, request, session
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import Forbidden, HTTPException, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from config import Settings
from config.logging import gunicorn_logconfig, log_context
from config.settings import ConfigError
from server.access import Action, allowed, required_action
from server.api import register_api
from server.authentication import Authenticator
from server.cheroot_connection import connection_class
from server.context import ANONYMOUS, UNAUTHENTICATED, Principal, RequestContext
from server.cors import StoredOrigins, configure_cors
from server.dicomweb import register_dicomweb
from server.dicomweb.media_types import NotAcceptable
from server.dicomweb.multipart import MultipartError
from server.dicomweb.statuses import http_status_for
from server.fhir import register_fhir
from server.metrics import Metrics, mark_worker_dead
from server.monitoring import register_monitoring
from server.partitions import PARTITION_ROOT, KnownPartitions, enter_partition
from server.request_body import BoundedRequest
from server.request_deadlines import RequestDeadlines, RequestLimits, guarded
from storage.accounts import Accounts
from storage.archive import Archive
from storage.errors import StorageError, StorageUnavailable
from storage.settings_seed import seed_from_settings
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
    # Every route's body (JSON API, forms) is bounded, also a chunked one (413 with the
    # reason, server/request_body.py); STOW-RS raises the limit for its own request
    # (http.stow_max_bytes) before it reads a byte.
    app.request_class = BoundedRequest
    app.config["MAX_CONTENT_LENGTH"] = settings.http.body_max_bytes
    app.extensions["hilum.settings"] = settings
    app.extensions["hilum.archive"] = archive
    app.extensions["hilum.partitions"] = KnownPartitions(archive.index)
    _register_blueprints(app, settings)
    register_monitoring(app, archive, metrics)  # /healthz, /readyz, /metrics
    _register_error_handlers(app)
    # The settings file's origins (and DIMSE AE permissions, C-MOVE destinations) seed the
    # index on first start; then the index is what counts.
    try:
        seed_from_settings(archive.index, settings)
    except StorageUnavailable as error:  # the pages say so; copied at the next start
        log.warning("the settings' seeds were not copied into the index: %s", error)
    configure_cors(app, StoredOrigins(archive.index), wildcard=not settings.auth.enabled)
    app.after_request(_strict_transport_security)
    if settings.http.trusted_proxies:
        proxies = settings.http.trusted_proxies
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=proxies, x_proto=proxies, x_host=proxies, x_port=proxies,
            x_prefix=proxies,
        )  # fmt: skip

    _configure_access(app, settings, archive)
    # Outermost: the id is known before a trusted proxy's headers are applied, and still set
    # while a streamed response is sent.
    app.wsgi_app = _with_request_id(app.wsgi_app)  # type: ignore[method-assign]
    return app


REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_KEY = "hilum.request_id"  # the WSGI environ's
# A client's (or a proxy's) X-Request-Id is kept when it is a short token: it goes into every
# log line and the audit trail (64 characters there); anything else gets a new id.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,64}")


def request_id_for(header: str | None) -> str:
    if header and _CLIENT_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex[:12]


def _with_request_id(wsgi_app: Any) -> Any:
    """Each request's id (the client's ``X-Request-Id``, or a new one): in the environ for the
    request context, on every log line while the request is served and its response sent, and
    in the response's ``X-Request-Id`` header (gunicorn's access log reads it there)."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        request_id = request_id_for(environ.get("HTTP_X_REQUEST_ID"))
        environ[REQUEST_ID_KEY] = request_id

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers.append((REQUEST_ID_HEADER, request_id))
            return start_response(status, headers, exc_info)

        with log_context(request_id=request_id):
            body = wsgi_app(environ, start)
            try:
                yield from body
            finally:
                if hasattr(body, "close"):
                    body.close()

    return app


def _register_blueprints(app: Flask, settings: Settings) -> None:
    """Every family of routes is registered here, one line each; each at the default
    partition's root and at another partition's (``/partitions/<partition>``, server.partitions).
    The views work on ``server.partitions.request_archive()``."""
    register_dicomweb(app, settings)  # /dicomweb (QIDO, WADO, STOW, DELETE), /wado
    register_api(app, settings)  # /api (AI jobs, the change feed), /api/admin
    register_fhir(app, settings)  # /fhir: read-only FHIR R4
    register_web(app, settings)  # the browser UI: /, /studies/…, /jobs, /upload, the viewer


# RFC 6797: browsers that reached Hilum over HTTPS use nothing else for a year. Sent on every
# HTTPS response ([http] tls_*, or a trusted proxy's X-Forwarded-Proto: https); browsers ignore
# it over plain HTTP. No includeSubDomains: other hosts of a hospital's domain may be HTTP-only.
HSTS = "max-age=31536000"


def _strict_transport_security(response: Response) -> Response:
    if request.is_secure:
        response.headers.setdefault("Strict-Transport-Security", HSTS)
    return response


class _Sessions(SecureCookieSessionInterface):
    """Flask's signed session cookie, marked Secure when the request came over HTTPS (directly,
    or through a trusted proxy's X-Forwarded-Proto)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure

    def open_session(self, app: Flask, request: Any) -> Any:
        # No cookie (API clients, first visits): an empty session without building the signing
        # serializer, which costs more than the whole access check.
        name = self.get_cookie_name(app)
        if name not in request.environ.get("HTTP_COOKIE", "") or name not in request.cookies:
            return self.session_class()
        return super().open_session(app, request)


# Methods that change nothing (RFC 9110 9.2.1): no CSRF token needed.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"
# The browser UI's blueprints (web/): a page asked for without a login goes to the login page.
UI_BLUEPRINTS = frozenset({"web", "login", "pages", "partition_pages"})
CSRF_FIELD = "csrf_token"


def _configure_access(app: Flask, settings: Settings, archive: Archive) -> None:
    """The access check: one ``before_request`` for every route of the app (DICOMweb, the JSON
    API, the UI). Each view names the action it needs (``server.access.requires``); a view
    that names none is refused, whether or not authentication is on."""
    auth = settings.auth
    authenticator: Authenticator | None = None
    if auth.enabled:
        from server.oidc import OidcVerifier

        app.secret_key = auth.secret_for_sessions(settings.server.data_dir)
        app.session_interface = _Sessions()
        app.config.update(
            SESSION_COOKIE_NAME="hilum_session",
            SESSION_COOKIE_HTTPONLY=True,
            SESSION_COOKIE_SAMESITE="Lax",
            PERMANENT_SESSION_LIFETIME=timedelta(seconds=auth.session_lifetime_s),
        )
        oidc = OidcVerifier(auth.oidc) if auth.oidc.enabled else None
        authenticator = Authenticator(auth, Accounts(archive.index), oidc)
    app.extensions["hilum.authenticator"] = authenticator

    @app.before_request
    def _request_context() -> Response | None:
        """The request's context (who, from where, which partition), made here once, and the
        access check: 401 without valid credentials, then 404 for a partition that does not
        exist or that the principal may not see (the same 404: nobody learns another tenant's
        partition names), then 403 for an action the principal's roles do not allow."""
        # Set by _with_request_id; a request context made without the WSGI app (a benchmark's
        # test_request_context) makes its own.
        g.request_id = request.environ.get(REQUEST_ID_KEY) or request_id_for(
            request.headers.get(REQUEST_ID_HEADER)
        )
        rule = request.url_rule
        # The partition the URL names (its root /partitions/<partition>/…); the views never
        # see the URL value.
        requested = None
        if rule is not None and rule.rule.startswith(PARTITION_ROOT) and request.view_args:
            requested = request.view_args.pop("partition", None)
        # Authentication off: whoever reaches the port may do everything (loopback only).
        nobody = UNAUTHENTICATED if authenticator is None else ANONYMOUS
        g.hilum_context = RequestContext(
            nobody, request.remote_addr or "", "http", request_id=g.request_id
        )
        if rule is None:
            return None  # no such route (404) or method (405): Flask answers
        if request.method == "OPTIONS" and getattr(rule, "provide_automatic_options", False):
            return None  # Flask's own answer (CORS preflight): no view runs
        action = required_action(app.view_functions[rule.endpoint])
        if action is None:
            log.error(
                "route %s (%s) names no action (@requires): refused; every route must name one",
                rule.endpoint,
                rule.rule,
            )
            raise Forbidden("this route has no access rule (a bug in Hilum); refused")
        principal, presented, from_session = None, False, False
        if authenticator is not None:
            principal, presented, from_session = _authenticate(authenticator)
            if principal is not None:
                g.hilum_context = dataclasses.replace(g.hilum_context, principal=principal)
            elif action is not Action.PUBLIC:
                return _unauthenticated(presented)
        g.hilum_context = enter_partition(g.hilum_context, requested)
        if not allowed(g.hilum_context.principal.roles, action):
            raise Forbidden(
                f"{g.hilum_context.principal.name} "
                f"({', '.join(sorted(g.hilum_context.principal.roles)) or 'no role'}) may not "
                f"do this: it needs the {action.value!r} permission"
            )
        if (
            authenticator is not None
            and request.method not in _SAFE_METHODS
            and (from_session or principal is None)
        ):
            _check_csrf()
        return None


def _authenticate(authenticator: Authenticator) -> tuple[Principal | None, bool, bool]:
    """(principal or None, whether credentials were presented, whether from the session)."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, True, False
        return authenticator.bearer(token.strip()), True, False
    if "user" in session:
        return authenticator.session_principal(session), True, True
    return None, False, False


def _unauthenticated(presented: bool) -> Response:
    browser = "Authorization" not in request.headers  # an API client gets 401 even here
    if browser and request.blueprint in UI_BLUEPRINTS:
        from urllib.parse import quote, urlsplit

        # A page: to the login page, back here afterwards; a form sent after the session
        # ended: to the login page, back to the page the form was on.
        if request.method in ("GET", "HEAD"):
            target = request.full_path if request.query_string else request.path
        else:
            referrer = urlsplit(request.referrer or "")
            same_site = referrer.netloc == request.host and referrer.path.startswith("/")
            target = referrer.path if same_site else "/"
        return redirect("/login?next=" + quote(target, safe="/"), 303)  # type: ignore[return-value]
    response = _error(
        401,
        "the credentials are not valid (unknown, expired or revoked)"
        if presented
        else "authentication required: send Authorization: Bearer TOKEN, or log in",
    )
    # RFC 6750 3: the challenge; invalid_token when a token was sent.
    challenge = 'Bearer realm="hilum"' + (', error="invalid_token"' if presented else "")
    response.headers["WWW-Authenticate"] = challenge
    return response


def _check_csrf() -> None:
    """A state-changing request carried by the browser's session cookie must also carry the
    session's CSRF token (header, or form field of an HTML form): another site's page can
    make the browser send the cookie, not read the token."""
    expected = session.get("csrf")
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.mimetype == "application/x-www-form-urlencoded":
        given = request.form.get(CSRF_FIELD)
    if not (isinstance(expected, str) and given and hmac.compare_digest(expected, given)):
        raise Forbidden("the form is out of date or came from another site: reload the page")


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

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(error: RequestEntityTooLarge) -> Response:
        # A body over its limit says which (server/request_body.py); werkzeug's own words
        # come from its form parser's limits (Flask's MAX_FORM_MEMORY_SIZE, MAX_FORM_PARTS).
        if error.description == RequestEntityTooLarge.description:
            return _error(
                413,
                f"a form field is larger than {request.max_form_memory_size} bytes, or the "
                f"form has more than {request.max_form_parts} parts",
            )
        return _error(413, str(error.description))

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        return _error(error.code or 500, error.description or error.name)


def https_files(settings: Settings) -> tuple[Path, Path] | None:
    """``[http] tls_certificate`` and ``tls_private_key``, checked by loading them now (a
    clear :class:`ConfigError` at start, not a failed handshake later); None: plain HTTP."""
    http = settings.http
    if not (http.tls_certificate and http.tls_private_key):
        return None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            http.tls_certificate, http.tls_private_key
        )
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"[http] tls_certificate {http.tls_certificate} and tls_private_key "
            f"{http.tls_private_key} cannot be used for HTTPS: {error} (PEM files: the "
            "certificate, with its chain, and its unencrypted private key)"
        ) from error
    return http.tls_certificate, http.tls_private_key


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
        limits: RequestLimits | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """``limits``: ``[http]``'s deadlines and connection cap (RequestLimits.from_settings);
        ``tls``: (certificate, private key) PEM files: HTTPS (``[http] tls_*``)."""
        self._deadlines = RequestDeadlines(limits or RequestLimits())
        self._server = cheroot.wsgi.Server(
            (host, port),
            _access_logged(guarded(app, self._deadlines)),
            numthreads=threads,
            server_name="hilum",
            request_queue_size=64,
            timeout=60,  # seconds a client may stay silent inside a request
        )
        # cheroot's default, stated: no body limit here; the app answers 413 with a reason
        # (http.stow_max_bytes, http.body_max_bytes).
        self._server.max_request_body_size = 0
        # Deadlines on each request and a cap on connections (server/request_deadlines.py
        # says why), and a size on the headers: cheroot's default 0 reads any size into memory.
        self._server.ConnectionClass = connection_class(self._deadlines)
        self._server.max_request_header_size = MAX_REQUEST_HEADER_BYTES
        if tls is not None:
            # cheroot's TLS adapter: the handshake on accept, the WSGI environ says https.
            adapter = BuiltinSSLAdapter(str(tls[0]), str(tls[1]))
            adapter.context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195
            self._server.ssl_adapter = adapter
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
            with log_context(request_id=environ.get(REQUEST_ID_KEY, "-")):
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

    from gunicorn.app.base import BaseApplication

    import config
    from storage.archive import open_archive

    tls = https_files(settings)

    class HilumWeb(BaseApplication):  # type: ignore[misc]
        # Read by each worker (server/gunicorn_worker.py).
        request_limits = RequestLimits.from_settings(settings.http)

        def load_config(self) -> None:
            conf = runpy.run_path(str(Path(config.__file__).parent / "gunicorn.conf.py"))
            for name, value in conf.items():
                if name in self.cfg.settings:
                    self.cfg.set(name, value)
            self.cfg.set("bind", [f"{settings.server.host}:{settings.http.port}"])
            if tls is not None:
                self.cfg.set("certfile", str(tls[0]))
                self.cfg.set("keyfile", str(tls[1]))
            self.cfg.set("workers", settings.http.workers)
            self.cfg.set("threads", settings.http.threads)
            # Each request under Hilum's deadlines, and the caps on a worker's open connections
            # (server/gunicorn_worker.py): the worker refuses those over max_connections itself,
            # so gunicorn's own cap, which would leave them waiting in the listen queue, is above.
            self.cfg.set("worker_class", "server.gunicorn_worker.DeadlineThreadWorker")
            self.cfg.set("worker_connections", settings.http.max_connections + 1)
            self.cfg.set("proc_name", "hilum-web")
            self.cfg.set("when_ready", _announce)
            self.cfg.set("child_exit", lambda _server, worker: mark_worker_dead(worker.pid))
            if settings.log.format == "json":  # gunicorn's own lines too, access log included
                self.cfg.set("logconfig_dict", gunicorn_logconfig("web"))

        # types-gunicorn declares start_response narrower than PEP 3333 (wsgiref.types), which
        # Flask declares: a Flask app is a WSGI app all the same.
        def load(self) -> Flask:  # type: ignore[override]
            # In each worker, after the fork.
            # Each worker's pool: as many connections as its threads can use at once.
            return create_app(settings, open_archive(settings, connections=settings.http.threads))

    def _announce(_server: object) -> None:
        print(
            f"Hilum is listening: HTTP {settings.http.scheme}://{settings.server.host}:"
            f"{settings.http.port}"
            f"/dicomweb ({settings.http.workers} workers); index "
            f"{settings.database_url_for_display}; blobs {settings.blob_url}",
            flush=True,
        )

    HilumWeb().run()
