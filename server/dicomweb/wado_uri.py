"""WADO-URI (PS3.18 9): ``/wado?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…`` for
legacy viewers. One object per request: the DICOM file, or a rendered JPEG/PNG."""

from __future__ import annotations

from collections.abc import Iterable

from flask import Blueprint, Response, request
from pydicom.uid import ExplicitVRLittleEndian

from config import Settings
from server.access import Action, requires
from server.dicomweb.media_types import DICOM, NotAcceptable, can_transcode
from server.dicomweb.rendering import RENDERED_TYPES, RenderedTransaction
from server.dicomweb.urls import check_uid
from server.dicomweb.wado import RetrieveTransaction, one_instance
from server.partitions import request_archive
from storage.archive import Archive
from storage.errors import InvalidQuery
from storage.pixel_decoding import RenderingParameters
from storage.query import StoredInstance


def _required(name: str) -> str:
    value = request.args.get(name, "")
    if not value:
        raise InvalidQuery(f"WADO-URI needs the {name} parameter")
    return value


def _uid(name: str, what: str) -> str:
    # A UID, never a matching value (no "*" or lists).
    return check_uid(_required(name), what)


def _positive(name: str) -> int | None:
    if name not in request.args:
        return None
    try:
        value = int(request.args[name])
    except ValueError:
        raise InvalidQuery(f"{name} must be a whole number") from None
    if value < 1:
        raise InvalidQuery(f"{name} must be positive")
    return value


class WadoUri:
    def __init__(self, settings: Settings) -> None:
        self.retrieve = RetrieveTransaction(settings)
        self.rendered = RenderedTransaction(settings)

    @property
    def archive(self) -> Archive:
        """The request's archive, scoped to its partition (``server.partitions``)."""
        return request_archive()

    @requires(Action.RETRIEVE)
    def retrieve_object(self) -> Response:
        if request.args.get("requestType") != "WADO":
            raise InvalidQuery("requestType must be WADO (PS3.18 9.1.2.1.1)")
        stored = one_instance(
            self.archive,
            _uid("studyUID", "Study"),
            _uid("seriesUID", "Series"),
            _uid("objectUID", "SOP Instance"),
            with_frame_ranges=True,
        )
        # PS3.18 9.1.2.1.5: a list of acceptable types; image/jpeg when absent.
        wanted = [t.strip() for t in request.args.get("contentType", "image/jpeg").split(",")]
        for content_type in wanted:
            if content_type == DICOM:
                return self._dicom(stored)
            if content_type in RENDERED_TYPES:
                return self._rendered(stored, content_type)
        raise NotAcceptable(f"contentType {','.join(wanted)[:80]} is not available")

    def _dicom(self, stored: StoredInstance) -> Response:
        # PS3.18 9.1.2.1.6: transferSyntax; the default is Explicit VR Little Endian, but a
        # stored compressed object goes as stored unless asked (what viewers expect).
        syntax = request.args.get("transferSyntax") or stored.transfer_syntax_uid
        if not can_transcode(stored.transfer_syntax_uid, syntax):
            raise NotAcceptable(
                f"cannot send {stored.transfer_syntax_uid} as {syntax} "
                f"(try {ExplicitVRLittleEndian})"
            )
        body: Iterable[bytes] = self.retrieve.instance_bytes(stored, syntax)
        return Response(body, content_type=DICOM, direct_passthrough=True)

    def _rendered(self, stored: StoredInstance, media_type: str) -> Response:
        frame = _positive("frameNumber") or 1
        window = None
        if "windowCenter" in request.args and "windowWidth" in request.args:
            try:
                window = (
                    float(request.args["windowCenter"]),
                    float(request.args["windowWidth"]),
                    "linear",
                )
            except ValueError:
                raise InvalidQuery("windowCenter and windowWidth must be numbers") from None
        rows, columns = _positive("rows"), _positive("columns")
        viewport = (columns or rows or 0, rows or columns or 0) if rows or columns else None
        quality = _positive("imageQuality") or 90
        params = RenderingParameters(window, viewport, min(quality, 100))
        return self.rendered.render_frame(stored, frame, params, media_type)


def blueprint(settings: Settings) -> Blueprint:
    wado_uri = WadoUri(settings)
    bp = Blueprint("wado_uri", __name__)
    bp.add_url_rule("/wado", view_func=wado_uri.retrieve_object, methods=["GET"])
    return bp
