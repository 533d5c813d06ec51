"""STOW-RS, Store Transaction (PS3.18 10.5): a multipart/related body of DICOM Part 10 files,
read as a stream, each part spooled to ``<data_dir>/tmp`` and stored by ``ingest_file``."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from flask import Blueprint, Response, jsonify, request
from pydicom.dataset import Dataset
from werkzeug.exceptions import RequestEntityTooLarge, UnsupportedMediaType
from werkzeug.http import parse_options_header

from config import Settings
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
from storage.archive import Archive
from storage.dicom_file import read_instance_header
from storage.errors import InvalidInstance, StorageError
from storage.ingest import IngestOutcome, Origin, ingest_file

log = logging.getLogger(__name__)


class _LimitedStream:
    """The request body, refused with 413 as soon as it grows past the configured limit
    (a chunked body has no Content-Length to check up front)."""

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(size)
        self.read_bytes += len(chunk)
        if self.read_bytes > self.limit:
            raise RequestEntityTooLarge(f"the body is larger than {self.limit} bytes")
        return chunk


class StoreTransaction:
    def __init__(self, archive: Archive, settings: Settings) -> None:
        self.archive = archive
        self.max_bytes = settings.http.stow_max_bytes
        self.tmp_dir = (settings.server.data_dir / "tmp").resolve()
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

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

    def store_instances(self, study: str | None = None) -> Response:
        boundary = self._boundary()
        if request.content_length is not None and request.content_length > self.max_bytes:
            raise RequestEntityTooLarge(
                f"the body ({request.content_length} bytes) is larger than the limit "
                f"of {self.max_bytes} bytes (http.stow_max_bytes)"
            )
        stream = _LimitedStream(request.stream, self.max_bytes)
        referenced: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        spooled: list[str] = []

        def spool() -> BinaryIO:
            # tmp*.dcm: a file left by a crash is removed by the DIMSE server's janitor.
            file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed by the loop)
                dir=self.tmp_dir, prefix="tmp", suffix=".dcm", delete=False
            )
            spooled.append(file.name)
            return file

        try:
            for part in read_parts(stream, boundary, spool):
                try:
                    self._store_part(part, study, referenced, failed)
                finally:
                    part.file.close()
                    with contextlib.suppress(OSError):
                        os.unlink(part.file.name)
                    spooled.remove(part.file.name)
        except (MultipartError, RequestEntityTooLarge) as error:
            if not referenced and not failed:
                raise
            return self._interrupted(study, referenced, failed, error)
        finally:
            # Every spooled part goes, also the one a broken, oversized or abandoned body
            # left half-written.
            for name in spooled:
                with contextlib.suppress(OSError):
                    os.unlink(name)
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

    def _store_part(
        self,
        part: ReceivedPart,
        study: str | None,
        referenced: list[dict[str, Any]],
        failed: list[dict[str, Any]],
    ) -> None:
        path = Path(part.file.name)
        part.file.close()
        _add_missing_preamble(path)
        sop_class = sop_instance = ""
        try:
            part_type = parse_options_header(part.content_type)[0] if part.content_type else DICOM
            if part_type.lower() != DICOM:
                raise InvalidInstance(f"a part of type {part_type!r} is not application/dicom")
            header = read_instance_header(path)
            sop_class, sop_instance = header.sop_class_uid, header.sop_instance_uid
            if study is not None and header.study_instance_uid != study:
                failed.append(_failed(sop_class, sop_instance, STUDY_INSTANCE_UID_MISMATCH))
                return
            # The spooled part lies under <data_dir>/tmp and is deleted after this part.
            result = ingest_file(self.archive, path, Origin(), header=header, temporary=True)
        except StorageError as error:
            log.info("STOW-RS part %s refused: %s", sop_instance or "(unparsed)", error)
            failed.append(_failed(sop_class, sop_instance, failure_reason_for(error)))
            return
        item = {
            "00081150": {"vr": "UI", "Value": [sop_class]},
            "00081155": {"vr": "UI", "Value": [sop_instance]},
            "00081190": {
                "vr": "UR",
                "Value": [
                    urls.instance_url(
                        header.study_instance_uid, header.series_instance_uid, sop_instance
                    )
                ],
            },
        }
        if result.outcome is IngestOutcome.KEPT_EXISTING:
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


def _add_missing_preamble(path: Path) -> None:
    """PS3.10 7.1: a file starts with a 128-byte preamble and "DICM". Some clients (pydicom's
    ``dcmwrite`` without ``enforce_file_format``, hence dicomweb-client) send the File Meta
    Information without them; the one ingest path reads Part 10 files only, so add them."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM" or not head.startswith(b"\x02\x00"):
        return
    fixed = path.with_name(path.name + ".part10")
    with open(fixed, "wb") as out, open(path, "rb") as src:
        out.write(b"\x00" * 128 + b"DICM")
        shutil.copyfileobj(src, out, 1 << 20)
    os.replace(fixed, path)


def _failed(sop_class: str, sop_instance: str, reason: int) -> dict[str, Any]:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    item.FailureReason = reason
    return item.to_json_dict()


def blueprint(archive: Archive, settings: Settings) -> Blueprint:
    stow = StoreTransaction(archive, settings)
    bp = Blueprint("stow", __name__)
    bp.add_url_rule("/studies", view_func=stow.store_instances, methods=["POST"])
    bp.add_url_rule("/studies/<study>", view_func=stow.store_instances, methods=["POST"])
    return bp
