"""WADO-RS, Retrieve Transaction (PS3.18 10.4): instances, metadata, frames and bulk data.

Instances stream from the blob store as stored, or transcoded when the Accept header asks for
another transfer syntax; metadata comes from the index without opening a DICOM file; frames
and Pixel Data bulk data are read by range using the frame offsets recorded at ingest.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import pydicom
from flask import Blueprint, Response, request, stream_with_context
from flask.typing import RouteCallable

from config import Settings
from server.access import Action, requires
from server.context import http_context
from server.dicomweb import urls
from server.dicomweb.frames import FrameReader, check_frames, parse_frame_list
from server.dicomweb.media_types import (
    DICOM,
    DICOM_JSON,
    OCTET_STREAM,
    AcceptedType,
    NotAcceptable,
    frame_representation,
    instance_transfer_syntax,
    parse_accept,
)
from server.dicomweb.multipart import OutgoingPart, new_boundary, write_parts
from server.dicomweb.spool import Spool
from server.partitions import request_archive
from server.transcoding import TranscodingRefused, transcoded_instance
from storage.archive import Archive
from storage.audit import AuditEvent, refusal_entry, retrieve_entries
from storage.dicom_file import PIXEL_DATA
from storage.errors import InvalidQuery, NotFound, StorageError
from storage.query import StoredInstance, entity_query, locate_instances

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


def located(
    archive: Archive,
    study: str,
    series: str | None = None,
    instance: str | None = None,
    *,
    with_metadata: bool = False,
    with_frame_ranges: bool = False,
) -> Iterator[StoredInstance]:
    """The stored instances under the URL's entity; :class:`NotFound` at once when there are
    none (the query runs here, before any response starts). Frame ranges (large for a
    whole-slide image) only where frames are read.

    Every WADO-RS, WADO-URI, rendered and thumbnail request comes here, and is recorded in the
    audit trail here, before anything is sent (PS3.15 A.5.3.7, Hilum the source): one record
    per request, with the study, and 1 instance for an instance-level request (0 for a whole
    study or series: its number is not counted before the response streams)."""
    query = entity_query(study, series, [instance] if instance else ())
    found = locate_instances(
        archive, query, with_metadata=with_metadata, with_frame_ranges=with_frame_ranges
    )
    detail = {"resource": request.path, "endpoint": request.endpoint or ""}
    try:
        first = next(found, None)
        if first is None:
            raise NotFound(f"no stored instance under {instance or series or study}")
    except StorageError as error:
        found.close()
        entry = refusal_entry(
            AuditEvent.RETRIEVE, error, service="DICOMweb", study_uids=[study], **detail
        )
        archive.record_refusal(http_context(), entry)
        raise
    try:
        archive.record(
            http_context(),
            *retrieve_entries({study: 1 if instance else 0}, service="DICOMweb", **detail),
        )
    except StorageError:
        found.close()
        raise

    def stream() -> Iterator[StoredInstance]:
        try:
            yield first
            yield from found
        finally:
            found.close()  # closes the database cursor if the client goes away

    return stream()


def one_instance(
    archive: Archive,
    study: str,
    series: str,
    instance: str,
    *,
    with_metadata: bool = True,
    with_frame_ranges: bool = False,
) -> StoredInstance:
    found = located(
        archive,
        study,
        series,
        instance,
        with_metadata=with_metadata,
        with_frame_ranges=with_frame_ranges,
    )
    try:
        return next(found)
    finally:
        found.close()  # type: ignore[attr-defined]


def multipart_response(parts: Iterator[OutgoingPart], part_type: str) -> Response:
    boundary = new_boundary()
    return Response(
        # URLs in the parts are built from the request while the body streams.
        stream_with_context(write_parts(parts, boundary)),
        content_type=f'multipart/related; type="{part_type}"; boundary={boundary}',
        direct_passthrough=True,
    )


def absolute_bulk_data_uris(elements: dict[str, Any], base: str, path: str = "") -> None:
    """Ingest stores BulkDataURIs relative (``bulkdata/<tag>``); clients need absolute URLs.

    Elements inside sequences get ``bulkdata/<sequence tag>/<item index>/<tag>``.
    """
    for tag, element in elements.items():
        if "BulkDataURI" in element:
            element["BulkDataURI"] = f"{base}/bulkdata/{path}{tag}"
        elif element.get("vr") == "SQ":
            for index, item in enumerate(element.get("Value") or []):
                absolute_bulk_data_uris(item, base, f"{path}{tag}/{index}/")


class RetrieveTransaction:
    """PS3.18 10.4: one method per target resource."""

    def __init__(self, settings: Settings) -> None:
        self.spool = Spool(settings.server.data_dir)
        self.transcode_max_bytes = settings.server.transcode_max_bytes

    @property
    def archive(self) -> Archive:
        """The request's archive, scoped to its partition (``server.partitions``)."""
        return request_archive()

    @property
    def frames(self) -> FrameReader:
        return FrameReader(self.archive, self.spool)

    # -- instances ----------------------------------------------------------------------------

    def _instances(self, found: Iterator[StoredInstance]) -> Response:
        accepted = parse_accept(request.headers.get("Accept"))
        # The first part is prepared before the status is sent: a 406 or a 503 is still
        # possible. The query's cursor is closed then, not left to the garbage collector.
        try:
            first = self._part(next(found), accepted)
        except BaseException:
            found.close()  # type: ignore[attr-defined]
            raise

        def parts() -> Iterator[OutgoingPart]:
            yield first
            for instance in found:
                try:
                    yield self._part(instance, accepted)
                except NotAcceptable as error:
                    # The status is sent; leaving one instance out beats a broken body.
                    log.warning("WADO-RS left out %s: %s", instance.sop_instance_uid, error)

        return multipart_response(parts(), DICOM)

    def _part(self, instance: StoredInstance, accepted: list[AcceptedType]) -> OutgoingPart:
        syntax = instance_transfer_syntax(accepted, instance.transfer_syntax_uid)
        return OutgoingPart(
            f"{DICOM}; transfer-syntax={syntax}",
            self.instance_bytes(instance, syntax),
            urls.instance_url(
                instance.study_instance_uid,
                instance.series_instance_uid,
                instance.sop_instance_uid,
            ),
        )

    def instance_bytes(self, instance: StoredInstance, syntax: str) -> Iterable[bytes]:
        """The Part 10 file in ``syntax``: streamed as stored, or transcoded now (in a decoder
        process), so that a transcoding failure is known before the part starts."""
        if syntax != instance.transfer_syntax_uid:
            return [self._transcoded(instance, syntax)]
        return self._stored_bytes(instance)

    def _stored_bytes(self, instance: StoredInstance) -> Iterator[bytes]:
        """The stored file in chunks. The blob is opened and its first chunk read here, when
        the part is prepared (the first before the status line): a store that cannot be
        reached is a 503 before the body starts (PS3.18 8.6.1.2), not a body cut short."""
        blob = self.archive.blobs.open(instance.blob_key, tier=instance.tier)
        try:
            first = blob.read(_CHUNK)
        except BaseException:
            blob.close()
            raise

        def chunks() -> Iterator[bytes]:
            with blob:
                chunk = first
                while chunk:
                    yield chunk
                    chunk = blob.read(_CHUNK)

        return chunks()

    def _transcoded(self, instance: StoredInstance, syntax: str) -> bytes:
        try:
            return transcoded_instance(self.archive, instance, syntax, self.transcode_max_bytes)
        except TranscodingRefused as refused:
            raise NotAcceptable(f"instance {instance.sop_instance_uid}: {refused}") from refused

    @requires(Action.RETRIEVE)
    def retrieve_study(self, study: str) -> Response:
        return self._instances(located(self.archive, study))

    @requires(Action.RETRIEVE)
    def retrieve_series(self, study: str, series: str) -> Response:
        return self._instances(located(self.archive, study, series))

    @requires(Action.RETRIEVE)
    def retrieve_instance(self, study: str, series: str, instance: str) -> Response:
        return self._instances(located(self.archive, study, series, instance))

    # -- metadata -----------------------------------------------------------------------------

    def _metadata(self, found: Iterator[StoredInstance]) -> Response:
        def body() -> Iterator[bytes]:
            yield b"["
            for i, instance in enumerate(found):
                metadata = instance.metadata or {}
                base = urls.instance_url(
                    instance.study_instance_uid,
                    instance.series_instance_uid,
                    instance.sop_instance_uid,
                )
                absolute_bulk_data_uris(metadata, base)
                yield (b"," if i else b"") + json.dumps(metadata, separators=(",", ":")).encode()
            yield b"]"

        return Response(stream_with_context(body()), content_type=DICOM_JSON)

    @requires(Action.RETRIEVE)
    def retrieve_study_metadata(self, study: str) -> Response:
        return self._metadata(located(self.archive, study, with_metadata=True))

    @requires(Action.RETRIEVE)
    def retrieve_series_metadata(self, study: str, series: str) -> Response:
        return self._metadata(located(self.archive, study, series, with_metadata=True))

    @requires(Action.RETRIEVE)
    def retrieve_instance_metadata(self, study: str, series: str, instance: str) -> Response:
        return self._metadata(located(self.archive, study, series, instance, with_metadata=True))

    # -- frames and bulk data -----------------------------------------------------------------

    def _frames_response(self, stored: StoredInstance, numbers: list[int]) -> Response:
        check_frames(stored, numbers)
        accepted = parse_accept(request.headers.get("Accept"))
        representation = frame_representation(accepted, stored.transfer_syntax_uid)
        base = urls.instance_url(
            stored.study_instance_uid, stored.series_instance_uid, stored.sop_instance_uid
        )
        frames = self.frames.frames(stored, numbers, decode=representation.decode)
        # The first frame is read before the status line: an unreachable store is still a
        # 503, a refused decode a 406, not a broken 200.
        first = next(frames)
        parts = (
            OutgoingPart(representation.part_type, [frame], f"{base}/frames/{n}")
            for n, frame in zip(numbers, itertools.chain([first], frames), strict=True)
        )
        return multipart_response(parts, representation.media_type)

    @requires(Action.RETRIEVE)
    def retrieve_frames(self, study: str, series: str, instance: str, frames: str) -> Response:
        try:
            numbers = parse_frame_list(frames)
        except ValueError as error:
            raise InvalidQuery(str(error)) from None
        stored = one_instance(self.archive, study, series, instance, with_frame_ranges=True)
        return self._frames_response(stored, numbers)

    @requires(Action.RETRIEVE)
    def retrieve_bulkdata(self, study: str, series: str, instance: str, path: str) -> Response:
        stored = one_instance(self.archive, study, series, instance, with_frame_ranges=True)
        steps = path.split("/")
        if steps == [f"{PIXEL_DATA:08X}"]:
            # PS3.18 8.7.3.3: Pixel Data bulk data is sent frame by frame, like frames.
            if not stored.number_of_frames or "7FE00010" not in (stored.metadata or {}):
                raise NotFound(f"instance {instance} has no Pixel Data")
            return self._frames_response(stored, list(range(1, stored.number_of_frames + 1)))
        value = _element_value(self.frames.read_header(stored), steps)
        return multipart_response(iter([OutgoingPart(OCTET_STREAM, [value])]), OCTET_STREAM)


def _element_value(dataset: pydicom.Dataset, steps: list[str]) -> bytes:
    """The value bytes of the element at ``<tag>[/<item>/<tag>…]`` (little endian)."""
    try:
        current: Any = dataset
        for i, step in enumerate(steps):
            if i % 2:
                current = current[int(step)]
            else:
                current = current[int(step, 16)]
                if i < len(steps) - 1:
                    current = current.value
    except (KeyError, IndexError, ValueError, TypeError):
        raise NotFound(f"no bulk data at {'/'.join(steps)[:120]}") from None
    value = current.value
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    raise NotFound(f"the element at {'/'.join(steps)[:120]} is not bulk data")


def blueprint(settings: Settings) -> Blueprint:
    wado = RetrieveTransaction(settings)
    bp = Blueprint("wado", __name__)
    instance = "/studies/<study>/series/<series>/instances/<instance>"
    rules: dict[str, RouteCallable] = {
        "/studies/<study>": wado.retrieve_study,
        "/studies/<study>/series/<series>": wado.retrieve_series,
        instance: wado.retrieve_instance,
        "/studies/<study>/metadata": wado.retrieve_study_metadata,
        "/studies/<study>/series/<series>/metadata": wado.retrieve_series_metadata,
        f"{instance}/metadata": wado.retrieve_instance_metadata,
        f"{instance}/frames/<frames>": wado.retrieve_frames,
        f"{instance}/bulkdata/<path:path>": wado.retrieve_bulkdata,
    }
    for rule, view in rules.items():
        bp.add_url_rule(rule, view_func=view, methods=["GET"])
    return bp
