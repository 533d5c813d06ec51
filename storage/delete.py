"""Deleting a study, a series or an instance: index rows first, in one transaction, then blobs.

The order mirrors ingest: once the transaction commits nothing refers to the blobs, so a blob
that cannot be deleted afterwards is an orphan (reported by ``hilum verify``), never a row
pointing at a missing file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, exists, select, update
from sqlalchemy.orm import Session

from storage.archive import Archive
from storage.audit import Actor, AuditEntry, AuditEvent, Requestor, audit_errors
from storage.dicom_file import is_valid_uid
from storage.errors import InvalidQuery, NotFound, StorageError
from storage.events import EventType, NewEvent, record_events
from storage.index.models import Instance, Patient, Series, Study

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deletion:
    instances: int
    orphan_blobs: list[str]  # blobs that could not be removed after the commit


# ``requestor``: who deletes (``server.context.RequestContext``), for the audit record written
# in the deletion's transaction (PS3.15 A.5.3.8); None: Hilum itself (the AI worker replacing
# its earlier results).


def delete_study(
    archive: Archive, study_uid: str, *, requestor: Requestor | None = None
) -> Deletion:
    return _delete(archive, study_uid, None, None, requestor)


def delete_series(
    archive: Archive, study_uid: str, series_uid: str, *, requestor: Requestor | None = None
) -> Deletion:
    return _delete(archive, study_uid, series_uid, None, requestor)


def delete_instance(
    archive: Archive,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    *,
    requestor: Requestor | None = None,
) -> Deletion:
    return _delete(archive, study_uid, series_uid, sop_uid, requestor)


def _delete(
    archive: Archive,
    study_uid: str,
    series_uid: str | None,
    sop_uid: str | None,
    requestor: Requestor | None,
) -> Deletion:
    for uid in (study_uid, series_uid, sop_uid):
        if uid is not None and not is_valid_uid(uid):
            raise InvalidQuery(f"{uid[:80]!r} is not a valid UID")
    partition = archive.partition
    with archive.index.write() as session:
        statement = (
            select(Instance.id, Instance.blob_key, Series.id, Study.id, Study.patient_pk)
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .where(Study.partition == partition, Study.study_instance_uid == study_uid)
        )
        if series_uid is not None:
            statement = statement.where(Series.series_instance_uid == series_uid)
        if sop_uid is not None:
            statement = statement.where(Instance.sop_instance_uid == sop_uid)
        rows = session.execute(statement).all()
        if not rows:
            what = sop_uid or series_uid or study_uid
            raise NotFound(f"no stored instance under {what}")
        session.execute(delete(Instance).where(Instance.id.in_({r[0] for r in rows})))
        study_pk, patient_pk = rows[0][3], rows[0][4]
        entities = (study_uid, series_uid, sop_uid)
        audited = _audit(archive, session, requestor, rows, patient_pk, entities)
        _delete_empty_parents(session, {r[2] for r in rows}, study_pk, patient_pk)
        # The outbox: the deletion's event commits with it (last statement).
        if sop_uid is not None:
            event = NewEvent(
                EventType.INSTANCE_DELETED,
                study_uid,
                {"SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid, "instances": 1},
            )
        elif series_uid is not None:
            event = NewEvent(
                EventType.SERIES_DELETED,
                study_uid,
                {"SeriesInstanceUID": series_uid, "instances": len(rows)},
            )
        else:
            event = NewEvent(EventType.STUDY_DELETED, study_uid, {"instances": len(rows)})
        record_events(session, partition, [event])
    if archive.audit is not None:
        archive.audit.emit(audited)
    keys = [r[1] for r in rows]
    log.info(
        "deleted %d instance(s) of study %s%s%s",
        len(keys),
        study_uid,
        f" series {series_uid}" if series_uid else "",
        f" instance {sop_uid}" if sop_uid else "",
    )
    # Keys are deterministic (UIDs and content hash): the same instance stored again since
    # the commit has the same key, and its blob must stay.
    orphans = [key for key in keys if not delete_blob_unless_referenced(archive, key)]
    return Deletion(len(keys), orphans)


def _audit(
    archive: Archive,
    session: Session,
    requestor: Requestor | None,
    rows: Sequence[Any],
    patient_pk: int,
    entities: tuple[str, str | None, str | None],
) -> list[dict[str, Any]]:
    """The deletion's audit record, in its transaction (A.5.3.8 DICOM Study Deleted; a series
    or an instance: the same message, with the level in the detail)."""
    if archive.audit is None:
        return []
    study_uid, series_uid, sop_uid = entities
    patient_id = session.execute(select(Patient.patient_id).where(Patient.id == patient_pk))
    detail = {"level": "instance" if sop_uid else "series" if series_uid else "study"}
    if series_uid:
        detail["series"] = series_uid
    if sop_uid:
        detail["instance"] = sop_uid
    entry = AuditEntry(
        AuditEvent.DELETE,
        patient_id=patient_id.scalar_one(),
        study_uids=(study_uid,),
        instances=len(rows),
        detail=detail,
    )
    with audit_errors():
        return archive.audit.append(
            session.connection(), [(requestor or Actor(partition=archive.partition), entry)]
        )


def delete_blob_unless_referenced(archive: Archive, key: str) -> bool:
    """Delete blob ``key`` unless a committed index row refers to it (an instance stored again
    with the same key, or a concurrent sender of the same content that won the race).

    False when it may be left behind (index or blob store unreachable): ``hilum verify``
    reports it as an orphan. A store that commits between the check and the delete can still
    lose its blob; the window is the length of one blob delete.
    """
    try:
        with archive.index.read() as session:
            referenced = session.execute(
                select(Instance.id).where(Instance.blob_key == key).limit(1)
            ).first()
    except StorageError as error:
        log.warning("index unreachable; blob %s left for `hilum verify`: %s", key, error)
        return False
    if referenced is not None:
        log.info("blob %s is referenced again (stored anew); kept", key)
        return True
    try:
        archive.blobs.delete(key)
    except StorageError as error:
        log.warning("could not delete blob %s; `hilum verify` will report it: %s", key, error)
        return False
    return True


def _delete_empty_parents(
    session: Session, series_pks: set[int], study_pk: int, patient_pk: int
) -> None:
    session.execute(
        delete(Series).where(
            Series.id.in_(series_pks), ~exists().where(Instance.series_pk == Series.id)
        )
    )
    modalities = session.execute(
        select(Series.modality).where(Series.study_pk == study_pk).distinct()
    ).scalars()
    remaining = sorted(m for m in modalities if m)
    if session.execute(select(exists().where(Series.study_pk == study_pk))).scalar():
        # PS3.4 C.6.2.1.2: ModalitiesInStudy lists the modalities of the series that remain.
        session.execute(
            update(Study)
            .where(Study.id == study_pk)
            .values(modalities_in_study="\\".join(remaining)[:255])
        )
        return
    session.execute(delete(Study).where(Study.id == study_pk))
    session.execute(
        delete(Patient).where(
            Patient.id == patient_pk, ~exists().where(Study.patient_pk == Patient.id)
        )
    )
