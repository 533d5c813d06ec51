"""STOW-RS, Store Transaction (PS3.18 10.5): a multipart/related body of DICOM Part 10 files,
read as a stream, each part spooled to ``<data_dir>/tmp`` and hashed on the way (as a C-STORE
data set is, ``server/dimse/c_store.py``), the parts stored in groups by ``ingest_files``."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydicom.dataset import Dataset
from werkzeug.exceptions import RequestEntityTooLarge, UnsupportedMediaType
from werkzeug.http import parse_options_header

from config import Settings
from server.access import Action, requires
from server.context import RequestContext, http_context
from server.dicomweb import urls
from server.dicomweb.media_types import DICOM, DICOM_JSON
from server.dicomweb.multipart import MultipartError, ReceivedPart, check_boundary, read_parts
from server.dicomweb.statuses import (
    CANNOT_UNDERSTAND,
    ELEMENTS_DISCARDED,
    OUT_OF_RESOURCES,
    STUDY_INSTANCE_UID_MISMATCH,
    failure_reason_for,
    warning_text,
)
from server.partitions import request_archive
from server.request_body import limit_body
from storage.archive import Archive
from storage.blobs import start_writeback
from storage.dicom_file import read_instance_header
from storage.errors import InvalidInstance, StorageError
from storage.ingest import IngestOutcome, Origin, Received, ingest_files

log = logging.getLogger(__name__)

# Parts stored together, with one index transaction (one commit): at most this many, or the
# group that reaches this size. The group's spooled parts wait in <data_dir>/tmp meanwhile.
GROUP_PARTS = 64
GROUP_BYTES = 64 << 20


class StoreTransaction:
    def __init__(self, settings: Settings) -> None:
        self.max_bytes = settings.http.stow_max_bytes
        self.tmp_dir = (settings.server.data_dir / "tmp").resolve()
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    @property
    def archive(self) -> Archive:
        """The request's archive, scoped to its partition (``server.partitions``)."""
        return request_archive()

    def _boundary(self) -> str:
        # PS3.18 10.5.1.1: multipart/related; type="application/dicom" is the only form
        # accepted here (the metadata + bulk data form is not supported).
        # RFC 9110 8.3.1: media type names are case-insensitive.
        media_type, options = parse_options_header(request.headers.get("Content-Type", ""))
        part_type = options.get("type", DICOM).strip().lower()
        if media_type.lower() != "multipart/related" or part_type != DICOM:
            raise UnsupportedMediaType(
                'STOW-RS accepts multipart/related; type="application/dicom" only, '
                f"not {request.headers.get('Content-Type', 'no Content-Type')!r}"
            )
        if "boundary" not in options:
            raise MultipartError("the Content-Type has no boundary parameter")
        return check_boundary(options["boundary"])

    @requires(Action.STORE)
    def store_instances(self, study: str | None = None) -> Response:
        # This route's own limit, in place of the app's (http.body_max_bytes): a larger
        # Content-Length is refused here, a chunked body as soon as it passes it (413).
        limit_body(self.max_bytes, "http.stow_max_bytes")
        boundary = self._boundary()
        # Once per request, not per part: the partition's archive and who stores.
        archive, requestor = self.archive, http_context()
        stream = request.stream
        referenced: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        group: list[Received | dict[str, Any]] = []  # read, not stored yet: in part order
        group_bytes = 0
        spooled: list[str] = []

        def spool() -> SpooledPart:
            file = SpooledPart(self.tmp_dir)
            spooled.append(str(file.path))
            return file

        def store_group() -> None:
            self._store_group(archive, group, referenced, failed)
            group.clear()
            _remove(spooled)

        try:
            try:
                for part in read_parts(stream, boundary, spool):
                    part.file.close()
                    group_bytes += part.file.size
                    group.append(self._check_part(part, study, archive, requestor))
                    if len(group) >= GROUP_PARTS or group_bytes >= GROUP_BYTES:
                        store_group()
                        group_bytes = 0
            except (MultipartError, RequestEntityTooLarge) as error:
                store_group()  # the parts received whole before the body broke off
                if not referenced and not failed:
                    raise
                return self._interrupted(study, referenced, failed, error)
            store_group()
        finally:
            # Every spooled part goes, also the one a broken, oversized or abandoned body
            # left half-written.
            _remove(spooled)
        return self._response(study, referenced, failed)

    def _interrupted(
        self,
        study: str | None,
        referenced: list[dict[str, Any]],
        failed: list[dict[str, Any]],
        error: Exception,
    ) -> Response:
        """The body broke off (malformed or over the limit) after some parts were handled.

        PS3.18 10.5.3 says what the stored instances are (ReferencedSOPSequence) but not how
        to report a body that breaks off: Hilum reports what it did, adds one Failed SOP item
        without UIDs (the part that broke off is unknown), and answers 202 when something was
        stored, else the error's own status (400 or 413); the reason is in a Warning header.
        """
        reason = OUT_OF_RESOURCES if isinstance(error, RequestEntityTooLarge) else CANNOT_UNDERSTAND
        failed.append(_failed("", "", reason))
        response = self._response(study, referenced, failed)
        if not referenced:
            response.status_code = 413 if isinstance(error, RequestEntityTooLarge) else 400
        text = getattr(error, "description", None) or str(error)
        response.headers["Warning"] = f'299 hilum "{warning_text(f"body broke off: {text}")}"'
        return response

    def _check_part(
        self,
        part: ReceivedPart[SpooledPart],
        study: str | None,
        archive: Archive,
        requestor: RequestContext,
    ) -> Received | dict[str, Any]:
        """The part, parsed, to store; or its Failed SOP item."""
        path = part.file.path
        try:
            part_type = parse_options_header(part.content_type)[0] if part.content_type else DICOM
            if part_type.lower() != DICOM:
                raise InvalidInstance(f"a part of type {part_type!r} is not application/dicom")
            header = read_instance_header(path, archive.limits)
        except StorageError as error:
            log.info("STOW-RS part refused: %s", error)
            return _failed("", "", failure_reason_for(error))
        if study is not None and header.study_instance_uid != study:
            return _failed(
                header.sop_class_uid, header.sop_instance_uid, STUDY_INSTANCE_UID_MISMATCH
            )
        # The spooled part lies under <data_dir>/tmp and is deleted once its group is stored.
        return Received(
            path,
            Origin(),
            header,
            temporary=True,
            sha256=(part.file.digest.hexdigest(), part.file.size),
            requestor=requestor,
        )

    def _store_group(
        self,
        archive: Archive,
        group: list[Received | dict[str, Any]],
        referenced: list[dict[str, Any]],
        failed: list[dict[str, Any]],
    ) -> None:
        """Store the parts of ``group`` with one ingest (one index transaction) and report
        each, in part order."""
        received = [entry for entry in group if isinstance(entry, Received)]
        outcomes = iter(ingest_files(archive, received) if received else [])
        for entry in group:
            if not isinstance(entry, Received):
                failed.append(entry)
                continue
            header, outcome = entry.header, next(outcomes)
            assert header is not None  # read by _check_part
            if isinstance(outcome, StorageError):
                log.info("STOW-RS part %s refused: %s", header.sop_instance_uid, outcome)
                failed.append(
                    _failed(
                        header.sop_class_uid, header.sop_instance_uid, failure_reason_for(outcome)
                    )
                )
                continue
            item: dict[str, dict[str, Any]] = {
                "00081150": {"vr": "UI", "Value": [header.sop_class_uid]},
                "00081155": {"vr": "UI", "Value": [header.sop_instance_uid]},
                "00081190": {
                    "vr": "UR",
                    "Value": [
                        urls.instance_url(
                            header.study_instance_uid,
                            header.series_instance_uid,
                            header.sop_instance_uid,
                        )
                    ],
                },
            }
            if outcome.outcome is IngestOutcome.KEPT_EXISTING:
                # PS3.18 Table 10.5.3-2: the stored instance was kept, the new content discarded.
                item["00081196"] = {"vr": "US", "Value": [ELEMENTS_DISCARDED]}
            referenced.append(item)

    def _response(
        self, study: str | None, referenced: list[dict[str, Any]], failed: list[dict[str, Any]]
    ) -> Response:
        body: dict[str, Any] = {}
        if study is not None:
            body["00081190"] = {"vr": "UR", "Value": [urls.study_url(study)]}
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": failed}
        if referenced:
            body["00081199"] = {"vr": "SQ", "Value": referenced}
        # PS3.18 10.5.3.1: 200 all stored, 202 some failed (or warnings), 409 none stored.
        if failed and not referenced:
            status = 409
        elif failed or any("00081196" in item for item in referenced):
            status = 202
        else:
            status = 200
        response = jsonify(body)
        response.status_code = status
        response.content_type = DICOM_JSON
        return response


class SpooledPart:
    """A part's content written to its temporary file as it is read, hashed on the way (ingest
    does not read the file again for its SHA-256), its writing to disk started when it is
    complete (:func:`storage.blobs.start_writeback`, as for a C-STORE data set).

    PS3.10 7.1: a file starts with a 128-byte preamble and "DICM". Some clients (pydicom's
    ``dcmwrite`` without ``enforce_file_format``, hence dicomweb-client) send the File Meta
    Information without them; the one ingest path reads Part 10 files only, so they are added
    here, before the part's first byte, when the part starts with group 0002 and has no
    "DICM" at offset 128.
    """

    def __init__(self, tmp_dir: Path) -> None:
        # tmp*.dcm: a file left by a crash is removed by the DIMSE server's janitor. mkstemp
        # and a plain file object: NamedTemporaryFile's wrapper would add a Python call to
        # every write.
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="tmp", suffix=".dcm")
        self.path = Path(name)
        self.digest = hashlib.sha256()
        self.size = 0
        self._file = open(fd, "wb")  # noqa: SIM115 (closed in close())
        self._head: bytearray | None = bytearray()  # until the preamble is decided

    def write(self, data: bytes | memoryview) -> int:
        written = len(data)
        if self._head is not None:
            wanted = _HEAD_BYTES - len(self._head)
            self._head += data[:wanted]
            if len(self._head) < _HEAD_BYTES:
                return written
            self._write_head()
            data = memoryview(data)[wanted:]
        if data:
            self._put(data)
        return written

    def seek(self, offset: int, whence: int = 0) -> int:
        self._write_head()
        return self._file.seek(offset, whence)

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._write_head()
            self._file.flush()
            start_writeback(self._file.fileno())
        finally:
            self._file.close()

    def _write_head(self) -> None:
        head, self._head = self._head, None
        if head is None:
            return
        if head.startswith(b"\x02\x00") and head[128:132] != b"DICM":
            self._put(_PREAMBLE)
        self._put(head)

    def _put(self, data: bytes | bytearray | memoryview) -> None:
        self._file.write(data)
        self.digest.update(data)
        self.size += len(data)


_HEAD_BYTES = 132  # PS3.10 7.1: the preamble and "DICM"
_PREAMBLE = bytes(128) + b"DICM"


def _remove(names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(name)
    names.clear()


def _failed(sop_class: str, sop_instance: str, reason: int) -> dict[str, Any]:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    item.FailureReason = reason
    return item.to_json_dict()


def blueprint(settings: Settings) -> Blueprint:
    stow = StoreTransaction(settings)
    bp = Blueprint("stow", __name__)
    bp.add_url_rule("/studies", view_func=stow.store_instances, methods=["POST"])
    bp.add_url_rule("/studies/<study>", view_func=stow.store_instances, methods=["POST"])
    return bp
