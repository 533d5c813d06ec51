"""Rendered resources and thumbnails (PS3.18 8.3.5, 10.4.1.1.3): a frame decoded with pydicom,
windowed, scaled to the viewport and encoded by Pillow as JPEG or PNG, in a decoder process
(:func:`storage.pixel_decoding.rendered_frame`)."""

from __future__ import annotations

import re

from flask import Blueprint, Response, request
from flask.typing import RouteCallable

from config import Settings
from server.access import Action, requires
from server.dicomweb.frames import (
    FrameReader,
    check_codestream,
    check_decodable,
    check_frames,
    decoded,
    parse_frame_list,
)
from server.dicomweb.media_types import NotAcceptable, matches, parse_accept
from server.dicomweb.spool import Spool
from server.dicomweb.wado import located, one_instance
from server.partitions import request_archive
from storage.archive import Archive
from storage.errors import InvalidQuery
from storage.pixel_decoding import (
    RENDERING_ATTRIBUTES,
    RenderingParameters,
    attributes,
    rendered_frame,
)
from storage.query import StoredInstance

RENDERED_TYPES = ("image/jpeg", "image/png")
THUMBNAIL_VIEWPORT = (128, 128)
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def rendering_parameters(default_viewport: tuple[int, int] | None = None) -> RenderingParameters:
    """PS3.18 8.3.5.1: the request's window, viewport and quality."""
    window = None
    if "window" in request.args:
        parts = request.args["window"].split(",")
        if len(parts) != 3 or not all(_NUMBER.match(p) for p in parts[:2]):
            raise InvalidQuery("window must be center,width,function")
        function = parts[2].lower()
        if function not in ("linear", "linear-exact", "sigmoid"):
            raise InvalidQuery("window function must be linear, linear-exact or sigmoid")
        if float(parts[1]) <= 0:
            raise InvalidQuery("window width must be positive")
        window = (float(parts[0]), float(parts[1]), function)
    viewport = default_viewport
    if "viewport" in request.args:
        parts = request.args["viewport"].split(",")
        try:
            viewport = (int(parts[0]), int(parts[1]))
        except (ValueError, IndexError):
            raise InvalidQuery("viewport must be vw,vh (whole numbers)") from None
        if min(viewport) < 1:
            raise InvalidQuery("viewport sizes must be positive")
    quality = 90
    if "quality" in request.args:
        try:
            quality = int(request.args["quality"])
        except ValueError:
            raise InvalidQuery("quality must be a whole number 1-100") from None
        if not 1 <= quality <= 100:
            raise InvalidQuery("quality must be 1-100")
    return RenderingParameters(window, viewport, quality)


def rendered_media_type() -> str:
    for accepted in parse_accept(request.headers.get("Accept")):
        for offered in RENDERED_TYPES:
            if matches(accepted.media_type, offered):
                return offered
    raise NotAcceptable("rendered images are available as image/jpeg or image/png")


class RenderedTransaction:
    def __init__(self, settings: Settings) -> None:
        self.spool = Spool(settings.server.data_dir)

    @property
    def archive(self) -> Archive:
        """The request's archive, scoped to its partition (``server.partitions``)."""
        return request_archive()

    @property
    def frames(self) -> FrameReader:
        return FrameReader(self.archive, self.spool)

    def render_frame(
        self, instance: StoredInstance, frame: int, params: RenderingParameters, media_type: str
    ) -> Response:
        """Frame ``frame`` of ``instance`` (located with metadata and frame ranges) rendered;
        WADO-RS rendered resources and WADO-URI both answer with this."""
        check_frames(instance, [frame])
        check_decodable(instance, self.archive)
        data = self.frames.read_frame(instance, frame)
        check_codestream(instance, data)
        metadata = attributes(instance.metadata or {}, RENDERING_ATTRIBUTES)
        syntax = instance.transfer_syntax_uid
        image = decoded(
            self.archive, instance, rendered_frame, metadata, syntax, data, params, media_type
        )
        return Response(image, content_type=media_type)

    def _render(
        self, instance: StoredInstance, frame: int, viewport: tuple[int, int] | None = None
    ) -> Response:
        media_type = rendered_media_type()
        params = rendering_parameters(viewport)
        return self.render_frame(instance, frame, params, media_type)

    def _instance(self, study: str, series: str, instance: str) -> StoredInstance:
        return one_instance(self.archive, study, series, instance, with_frame_ranges=True)

    def _representative(self, study: str, series: str | None = None) -> StoredInstance:
        # The middle instance of the series (or of the study): a typical slice, not the edge.
        # The light rows (no metadata, no frame ranges) are few bytes each; only the chosen one
        # is then located in full.
        rows = list(located(self.archive, study, series))
        middle = rows[len(rows) // 2]  # located() raised NotFound when there is none
        return self._instance(study, middle.series_instance_uid, middle.sop_instance_uid)

    @requires(Action.RETRIEVE)
    def retrieve_instance_rendered(self, study: str, series: str, instance: str) -> Response:
        return self._render(self._instance(study, series, instance), 1)

    @requires(Action.RETRIEVE)
    def retrieve_frames_rendered(
        self, study: str, series: str, instance: str, frames: str
    ) -> Response:
        return self._render(self._instance(study, series, instance), _first_frame(frames))

    @requires(Action.RETRIEVE)
    def retrieve_series_rendered(self, study: str, series: str) -> Response:
        return self._render(self._representative(study, series), 1)

    @requires(Action.RETRIEVE)
    def retrieve_study_thumbnail(self, study: str) -> Response:
        return self._render(self._representative(study), 1, THUMBNAIL_VIEWPORT)

    @requires(Action.RETRIEVE)
    def retrieve_series_thumbnail(self, study: str, series: str) -> Response:
        return self._render(self._representative(study, series), 1, THUMBNAIL_VIEWPORT)

    @requires(Action.RETRIEVE)
    def retrieve_instance_thumbnail(self, study: str, series: str, instance: str) -> Response:
        return self._render(self._instance(study, series, instance), 1, THUMBNAIL_VIEWPORT)

    @requires(Action.RETRIEVE)
    def retrieve_frames_thumbnail(
        self, study: str, series: str, instance: str, frames: str
    ) -> Response:
        stored = self._instance(study, series, instance)
        return self._render(stored, _first_frame(frames), THUMBNAIL_VIEWPORT)


def _first_frame(frames: str) -> int:
    """PS3.18 8.3.5: a rendered frame list renders its first frame (the only one here)."""
    try:
        return parse_frame_list(frames)[0]
    except ValueError as error:
        raise InvalidQuery(str(error)) from None


def blueprint(settings: Settings) -> Blueprint:
    rendered = RenderedTransaction(settings)
    bp = Blueprint("rendered", __name__)
    series = "/studies/<study>/series/<series>"
    instance = f"{series}/instances/<instance>"
    rules: dict[str, RouteCallable] = {
        f"{instance}/rendered": rendered.retrieve_instance_rendered,
        f"{instance}/frames/<frames>/rendered": rendered.retrieve_frames_rendered,
        f"{series}/rendered": rendered.retrieve_series_rendered,
        "/studies/<study>/thumbnail": rendered.retrieve_study_thumbnail,
        f"{series}/thumbnail": rendered.retrieve_series_thumbnail,
        f"{instance}/thumbnail": rendered.retrieve_instance_thumbnail,
        f"{instance}/frames/<frames>/thumbnail": rendered.retrieve_frames_thumbnail,
    }
    for rule, view in rules.items():
        bp.add_url_rule(rule, view_func=view, methods=["GET"])
    return bp
