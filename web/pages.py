"""The UI's blueprint: the hook every page passes through, the error pages, the template filters,
and the small pages (jobs, upload, viewer); the worklist and the study page have modules of their
own."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, g, render_template, request, send_from_directory
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import NotFound as HTTPNotFound

from config import Settings
from server.access import Action, requires
from server.context import http_context
from server.partitions import partition_prefix
from storage.archive import Archive
from storage.dicom_file import is_valid_uid
from storage.errors import Conflict, InvalidQuery, NotFound, StorageError, StorageUnavailable
from storage.index.models import DEFAULT_PARTITION
from storage.jobs import JobState
from storage.partitions import partition_names
from web import audit, login, study, worklist
from web.ohif import REVALIDATE, SPA_ROUTES, app_config, cache_control, installed, ohif_dir

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"


# Content-Security-Policy (CSP Level 3) of Hilum's own pages: their scripts, styles and images
# are Hilum's files (no inline script or style attribute in web/templates), thumbnails come from
# the same origin's DICOMweb, forms post to it, and no other site may frame them.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# The slide page (dicom-microscopy-viewer): the page's policy, plus compiling WebAssembly.
SLIDE_POLICY = PAGE_POLICY.replace("script-src 'self'", "script-src 'self' 'wasm-unsafe-eval'")
# The OHIF viewer's routes: its index.html has inline scripts, its bundle sets inline styles,
# compiles WebAssembly codecs and starts workers from blob: URLs; it still talks to this
# origin only and cannot be framed by another site.
VIEWER_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval' 'wasm-unsafe-eval' "
    "blob:; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' "
    "data:; connect-src 'self' data: blob:; worker-src 'self' blob:; object-src 'none'; "
    "base-uri 'self'; frame-ancestors 'self'"
)


def _content_security_policy(policy: str) -> Callable[[Response], Response]:
    def add(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", policy)
        return response

    return add


def _viewer_index(folder: Path) -> Response:
    response = send_from_directory(folder, "index.html")
    response.headers["Cache-Control"] = REVALIDATE
    return response


def pages_blueprint(settings: Settings) -> Blueprint:
    """The pages that show one partition's archive (the worklist, a study, the jobs, upload),
    registered at ``/`` for the default partition and at ``/partitions/{name}/`` for another."""
    blueprint = Blueprint("pages", __name__, template_folder="templates")
    blueprint.after_request(_content_security_policy(PAGE_POLICY))
    _register_errors(blueprint)
    worklist.register(blueprint, settings)
    study.register(blueprint, settings)

    @blueprint.context_processor
    def _partition() -> dict[str, Any]:
        # Every link, form and script of a page stays in the page's partition.
        # (Unset when the request was refused before its context was made: the error page.)
        context = g.get("hilum_context")
        if context is None:
            return _default_partition()
        return {"root": partition_prefix(context.partition), "partition": context.partition}

    @blueprint.get("/jobs")
    @requires(Action.JOBS)
    def jobs() -> Any:
        return render_template("jobs.html", nav="jobs", states=[str(s) for s in JobState])

    @blueprint.get("/upload")
    @requires(Action.STORE)
    def upload() -> Any:
        return render_template("upload.html", nav="upload")

    @blueprint.get("/studies/<study_uid>/series/<series_uid>/slide")
    @requires(Action.RETRIEVE)
    def slide(study_uid: str, series_uid: str) -> Any:
        """A whole slide (VL Whole Slide Microscopy) with the AI's SEG over it, in the
        dicom-microscopy-viewer that the pinned OHIF package carries (web/static/slide.js)."""
        if not (is_valid_uid(study_uid) and is_valid_uid(series_uid)):
            raise InvalidQuery("the study and the series must be UIDs")
        folder = ohif_dir(settings)
        if not installed(folder):
            return render_template("viewer_missing.html", folder=folder, studies=study_uid)
        root = partition_prefix(http_context().partition)
        response = Response(
            render_template(
                "slide.html",
                study_uid=study_uid,
                series_uid=series_uid,
                dicomweb_root=f"{root}/dicomweb",
            )
        )
        # The viewer compiles its WebAssembly codecs in a worker of its own.
        response.headers["Content-Security-Policy"] = SLIDE_POLICY
        return response

    @blueprint.get("/admin/dicom-access")
    @requires(Action.ADMIN)
    def dicom_access() -> Any:
        """Partitions, AE permissions, C-MOVE destinations (through /api/admin)."""
        return render_template("dicom_access.html", ae_title=settings.dimse.ae_title)

    return blueprint


def _default_partition() -> dict[str, Any]:
    """The template variables of a page outside any partition's root."""
    return {"root": "", "partition": DEFAULT_PARTITION}


def login_blueprint(settings: Settings, archive: Archive) -> Blueprint:
    """The login and logout pages (at the root only: a login is for the whole installation)."""
    blueprint = Blueprint("login", __name__, template_folder="templates")
    blueprint.after_request(_content_security_policy(PAGE_POLICY))
    _register_errors(blueprint)
    blueprint.context_processor(_default_partition)
    login.register(blueprint, settings, archive)
    return blueprint


def audit_blueprint(archive: Archive) -> Blueprint:
    """The audit page (at the root only: the trail is the whole installation's)."""
    blueprint = Blueprint("audit_page", __name__, template_folder="templates")
    blueprint.after_request(_content_security_policy(PAGE_POLICY))
    _register_errors(blueprint)
    blueprint.context_processor(_default_partition)
    audit.register(blueprint, archive)
    return blueprint


def web_blueprint(settings: Settings) -> Blueprint:
    """Hilum's static files and the OHIF viewer (at the site root only: the viewer's bundle
    loads its files from there)."""
    blueprint = Blueprint("web", __name__, template_folder="templates")
    blueprint.after_request(_content_security_policy(VIEWER_POLICY))
    _register_filters(blueprint)
    _register_errors(blueprint)

    blueprint.context_processor(_default_partition)

    # The UI's own style sheet and scripts: public (the login page needs them), no patient data.
    @blueprint.get("/hilum-static/<path:filename>", endpoint="static")
    @requires(Action.PUBLIC)
    def static_file(filename: str) -> Response:
        return send_from_directory(STATIC, filename)

    @blueprint.get("/viewer")
    @blueprint.get("/viewer/<path:_route>")
    @requires(Action.RETRIEVE)
    def viewer(_route: str = "") -> Any:
        """OHIF's page (its client-side router reads the URL), or how to install it."""
        folder = ohif_dir(settings)
        if installed(folder):
            return _viewer_index(folder)
        studies = request.args.get("StudyInstanceUIDs", "")
        return render_template("viewer_missing.html", folder=folder, studies=studies)

    @blueprint.get("/app-config.js")
    @requires(Action.RETRIEVE)
    def viewer_app_config() -> Response:
        context = http_context()
        visible = [
            name
            for name in partition_names(current_app.extensions["hilum.archive"].index)
            if context.principal.may_see(name)
        ]
        response = Response(app_config(visible), mimetype="text/javascript")
        # Made for this user (the partitions they may see): theirs only, asked again on each
        # open. (No ETag: with one, OHIF 3.12.10 did not draw an SR's outlines in
        # tests/web/test_viewer.py; the file is 1 KB.)
        response.headers["Cache-Control"] = f"private, {REVALIDATE}"
        return response

    # The viewer's own files, at the site root where its bundle asks for them.
    @blueprint.get("/<string:_name>")
    @blueprint.get("/assets/<path:_name>")
    @blueprint.get("/dicom-microscopy-viewer/<path:_name>")
    @requires(Action.RETRIEVE)
    def viewer_file(_name: str) -> Any:
        folder = ohif_dir(settings)
        if not installed(folder):
            raise HTTPNotFound(f"no page {request.path}")
        if _name in SPA_ROUTES:
            return _viewer_index(folder)
        path = request.path.lstrip("/")
        response = send_from_directory(folder, path)
        response.headers["Cache-Control"] = cache_control(path)
        return response

    return blueprint


def _register_filters(blueprint: Blueprint) -> None:
    @blueprint.app_template_filter("dicom_date")
    def dicom_date(value: str | None) -> str:
        # PS3.5 6.2 DA: YYYYMMDD
        if value and len(value) == 8 and value.isdigit():
            return f"{value[:4]}-{value[4:6]}-{value[6:]}"
        return value or ""

    @blueprint.app_template_filter("dicom_time")
    def dicom_time(value: str | None) -> str:
        # PS3.5 6.2 TM: HHMMSS.FFFFFF, components optional from the right
        if value and len(value) >= 4 and value[:4].isdigit():
            return f"{value[:2]}:{value[2:4]}"
        return value or ""

    @blueprint.app_template_filter("person_name")
    def person_name(value: str | None) -> str:
        # PS3.5 6.2.1: family^given^middle^prefix^suffix; the alphabetic group only.
        if not value:
            return ""
        parts = [p for p in value.split("=")[0].split("^")]
        family, given = parts[0], " ".join(p for p in parts[1:3] if p)
        return f"{family}, {given}" if given else family

    @blueprint.app_template_filter("when")
    def when(value: datetime | str | None) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.strftime("%Y-%m-%d %H:%M UTC")


def _page(status: int, heading: str, message: str, advice: str = "") -> Response:
    response = Response(
        render_template("error.html", heading=heading, message=message, advice=advice),
        status=status,
        mimetype="text/html",
    )
    return response


def _register_errors(blueprint: Blueprint) -> None:
    @blueprint.errorhandler(StorageUnavailable)
    def _unavailable(error: StorageUnavailable) -> Response:
        log.warning("page %s: %s", request.path, error)
        return _page(
            503,
            "Hilum cannot reach its storage",
            f"The index database or the blob store is not reachable: {error}",
            "Nothing was changed. Ask IT to check the database and storage servers, then reload.",
        )

    @blueprint.errorhandler(NotFound)
    def _not_found(error: NotFound) -> Response:
        return _page(404, "Not found", str(error))

    @blueprint.errorhandler(Conflict)
    def _conflict(error: Conflict) -> Response:
        return _page(409, "Not possible now", str(error))

    @blueprint.errorhandler(InvalidQuery)
    def _invalid(error: InvalidQuery) -> Response:
        return _page(400, "Invalid request", str(error))

    @blueprint.errorhandler(StorageError)
    def _storage(error: StorageError) -> Response:
        return _page(500, "Hilum could not do this", str(error))

    @blueprint.errorhandler(HTTPException)
    def _http(error: HTTPException) -> Response:
        return _page(error.code or 500, error.name, error.description or "")
