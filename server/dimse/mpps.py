"""Modality Performed Procedure Step SCP (PS3.4 Annex F.7): N-CREATE and N-SET.

A modality tells Hilum what it performed: N-CREATE (status IN PROGRESS) when it starts, N-SET
with COMPLETED (or DISCONTINUED) and the Performed Series Sequence (0040,0340), each series with
the SOP Instance UIDs of its images (Referenced Image Sequence, 0008,1140), when it ends. A
COMPLETED step whose images are all stored makes the study stable at once, so its AI jobs start
without waiting for ``[inference] stable_after_s`` (``inference/stability.py``). Hilum keeps
only that; it is no worklist and forwards nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from server.dimse.association import Association, Message
from server.dimse.commands import CommandField
from server.dimse.identifier import request_identifier
from server.dimse.statuses import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    MAY_NO_LONGER_BE_UPDATED,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    SUCCESS,
    UNRECOGNIZED_OPERATION,
)
from storage.archive import Archive
from storage.dicom_file import is_valid_uid
from storage.errors import Conflict, NotFound, StorageError
from storage.jobs import utc_now
from storage.mpps import PerformedStep, StepStatus, create_step, update_step

log = logging.getLogger(__name__)

MODALITY_PERFORMED_PROCEDURE_STEP = "1.2.840.10008.3.1.2.3.3"


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""


def _study(ds: Dataset) -> str:
    """The study: the Scheduled Step Attributes Sequence (0040,0270) names it (PS3.3 C.4.13)."""
    for item in ds.get("ScheduledStepAttributesSequence") or []:
        uid = _text(item, "StudyInstanceUID")
        if uid:
            return uid
    return ""


def _series(ds: Dataset) -> dict[str, list[str]] | None:
    """Performed Series Sequence (0040,0340): series -> its images' SOP Instance UIDs; None
    when the data set does not carry the sequence."""
    if "PerformedSeriesSequence" not in ds:
        return None
    series: dict[str, list[str]] = {}
    for item in ds.PerformedSeriesSequence or []:
        uid = _text(item, "SeriesInstanceUID")
        if uid:
            images = [
                _text(image, "ReferencedSOPInstanceUID")
                for image in item.get("ReferencedImageSequence") or []
            ]
            series.setdefault(uid, []).extend(i for i in images if i)
    return series


def _respond(
    assoc: Association,
    message: Message,
    field: int,
    status: int,
    instance_uid: str,
    comment: str = "",
    error_id: int | None = None,
) -> None:
    values: dict[str, Any] = {
        "AffectedSOPClassUID": MODALITY_PERFORMED_PROCEDURE_STEP,
        "CommandField": field,
        "MessageIDBeingRespondedTo": message.message_id,
        "Status": status,
    }
    if instance_uid:
        values["AffectedSOPInstanceUID"] = instance_uid
    if comment:
        values["ErrorComment"] = comment[:64]
    if error_id is not None:
        values["ErrorID"] = error_id
    assoc.send_command(message.context, values)


def _on_mpps_context(assoc: Association, message: Message, field: int) -> bool:
    """N-CREATE and N-SET serve MPPS only: on another context they are unrecognized."""
    if message.context.abstract_syntax == MODALITY_PERFORMED_PROCEDURE_STEP:
        return True
    assoc.send_command(
        message.context,
        {
            "AffectedSOPClassUID": message.context.abstract_syntax,
            "CommandField": field,
            "MessageIDBeingRespondedTo": message.message_id,
            "Status": UNRECOGNIZED_OPERATION,
        },
    )
    return False


def handle_n_create(assoc: Association, message: Message, archive: Archive) -> None:
    """PS3.4 F.7.2.1: create a step IN PROGRESS."""
    field = CommandField.N_CREATE_RSP
    if not _on_mpps_context(assoc, message, field):
        return
    uid = str(message.command.get("AffectedSOPInstanceUID") or "").strip() or generate_uid()
    ds = request_identifier(assoc, message)
    if ds is None or not is_valid_uid(uid):
        _respond(assoc, message, field, INVALID_ATTRIBUTE_VALUE, "", "undecodable data set or UID")
        return
    status = _text(ds, "PerformedProcedureStepStatus")
    if status != StepStatus.IN_PROGRESS:
        # PS3.4 F.7.2.1.2: a step is created IN PROGRESS.
        _respond(assoc, message, field, INVALID_ATTRIBUTE_VALUE, uid, "status must be IN PROGRESS")
        return
    step = PerformedStep(uid, StepStatus.IN_PROGRESS, _study(ds), _series(ds) or {})
    try:
        create_step(archive, step, assoc.calling_ae_title, utc_now())
    except Conflict:
        _respond(assoc, message, field, DUPLICATE_SOP_INSTANCE, uid)
        return
    except StorageError as error:
        _respond(assoc, message, field, PROCESSING_FAILURE, uid, str(error))
        return
    log.info("[%s] MPPS %s created (study %s)", assoc.name, uid, step.study_instance_uid)
    _respond(assoc, message, field, SUCCESS, uid)


def handle_n_set(assoc: Association, message: Message, archive: Archive) -> None:
    """PS3.4 F.7.2.2: update a step IN PROGRESS (to COMPLETED or DISCONTINUED)."""
    field = CommandField.N_SET_RSP
    if not _on_mpps_context(assoc, message, field):
        return
    uid = str(message.command.get("RequestedSOPInstanceUID") or "").strip()
    ds = request_identifier(assoc, message)
    if ds is None:
        _respond(assoc, message, field, INVALID_ATTRIBUTE_VALUE, uid, "undecodable data set")
        return
    text = _text(ds, "PerformedProcedureStepStatus")
    try:
        status = StepStatus(text) if text else None
    except ValueError:
        _respond(assoc, message, field, INVALID_ATTRIBUTE_VALUE, uid, f"status {text[:32]}")
        return
    try:
        step = update_step(
            archive,
            uid,
            status=status,
            study_instance_uid=_study(ds) or None,
            series=_series(ds),
            now=utc_now(),
        )
    except NotFound:
        _respond(assoc, message, field, NO_SUCH_OBJECT_INSTANCE, uid)
        return
    except Conflict:
        # PS3.4 F.7.2.2.2: 0110 with Error ID A710, no longer updatable.
        comment = "Performed Procedure Step Object may no longer be updated"
        _respond(assoc, message, field, MAY_NO_LONGER_BE_UPDATED, uid, comment, 0xA710)
        return
    except StorageError as error:
        _respond(assoc, message, field, PROCESSING_FAILURE, uid, str(error))
        return
    log.info("[%s] MPPS %s %s (%d series)", assoc.name, uid, step.status, len(step.series))
    _respond(assoc, message, field, SUCCESS, uid)
