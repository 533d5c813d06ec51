"""The one path by which anything is stored: DIMSE C-STORE, STOW-RS, ``hilum import`` and the
AI worker's results all call :func:`ingest_file`.

Order of work, so that a failure at any step loses nothing: parse and validate the header; write
the blob under a key that includes the content hash (so it never overwrites a stored file); then
write every index row in one transaction; only after that commits, delete a replaced blob. A
blob whose index transaction failed is deleted again; if even that fails, it is an orphan that
``hilum verify`` reports.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import Connection, bindparam, exc, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from storage.archive import Archive
from storage.delete import delete_blob_unless_referenced
from storage.dicom_file import (
    InstanceHeader,
    is_storage_sop_class,
    metadata_json,
    read_instance_header,
)
from storage.errors import InvalidInstance, SOPClassMismatch, StorageUnavailable
from storage.index.models import UI, Instance, Patient, Series, Study

log = logging.getLogger(__name__)
_MAX_ATTEMPTS = 10


class _ConcurrentChange(Exception):
    """The instance row changed between our read and our write."""


class IngestOutcome(enum.Enum):
    STORED = "stored"  # a new instance
    DUPLICATE = "duplicate"  # identical to the stored one: nothing written
    REPLACED = "replaced"  # same SOP Instance UID, new content, on_duplicate = "overwrite"
    KEPT_EXISTING = "kept-existing"  # same SOP Instance UID, new content, on_duplicate = "keep"


@dataclass(frozen=True)
class IngestResult:
    outcome: IngestOutcome
    sop_instance_uid: str
    study_instance_uid: str
    sha256: str


@dataclass(frozen=True)
class Origin:
    """Where an object came from, recorded with it."""

    calling_ae_title: str = ""
    # What the sender announced (C-STORE command); checked against the data set.
    announced_sop_class_uid: str | None = None
    announced_sop_instance_uid: str | None = None


def ingest_file(
    archive: Archive,
    path: Path,
    origin: Origin = Origin(),
    *,
    header: InstanceHeader | None = None,
    temporary: bool = False,
) -> IngestResult:
    """Store the DICOM Part 10 file at ``path`` (which the caller keeps and removes).

    ``header`` is the caller's own :func:`read_instance_header` of the same file, when it had
    to read it first (STOW-RS checks the Study Instance UID of each part): not parsed twice.
    ``temporary``: ``path`` is Hilum's own temporary file under the data directory, never
    written again (a received C-STORE data set or STOW-RS part): the filesystem blob store may
    hard-link it instead of copying it.
    """
    header = header or read_instance_header(path)
    _check_announced(header, origin)
    if not is_storage_sop_class(header.sop_class_uid):
        raise InvalidInstance(f"SOP Class {header.sop_class_uid} is not a storage SOP class")
    digest, size = _sha256(path)

    # Another association may insert or replace the same instance between our read and our
    # write; each retry sees the row it committed. Every round, one of the racers wins. Each
    # attempt writes the blob again: a concurrent delete may have removed it since the last.
    for _attempt in range(_MAX_ATTEMPTS):
        try:
            return _store(archive, path, header, digest, size, origin, temporary)
        except (exc.IntegrityError, _ConcurrentChange):
            continue
    raise StorageUnavailable(
        f"SOP Instance {header.sop_instance_uid} kept changing during {_MAX_ATTEMPTS} attempts"
    )


def _check_announced(header: InstanceHeader, origin: Origin) -> None:
    # PS3.4 B.2.3: 0xA900 when the data set does not match the SOP Class of the request.
    announced_class = origin.announced_sop_class_uid
    if announced_class is not None and announced_class != header.sop_class_uid:
        raise SOPClassMismatch(
            f"the request announced SOP Class {announced_class}, "
            f"the data set is {header.sop_class_uid}"
        )
    announced_uid = origin.announced_sop_instance_uid
    if announced_uid is not None and announced_uid != header.sop_instance_uid:
        raise SOPClassMismatch(
            f"the request announced SOP Instance {announced_uid}, "
            f"the data set is {header.sop_instance_uid}"
        )


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# Built once: executed with parameters on the transaction's connection, these skip the ORM
# and SQLAlchemy's per-statement cache-key work (half of the index time of an ingest).
_EXISTING_INSTANCE = select(Instance.id, Instance.sha256, Instance.blob_key).where(
    Instance.partition == bindparam("partition"),
    Instance.sop_instance_uid == bindparam("sop_instance_uid"),
)
_INSERT_INSTANCE = insert(Instance)
# The SET clause comes from the parameters: every column of _instance_values and series_pk.
_REPLACE_INSTANCE = update(Instance).where(
    Instance.id == bindparam("existing_id"), Instance.sha256 == bindparam("existing_sha")
)
_KNOWN_SERIES = (
    select(Series.id, Study.id)
    .join(Study, Series.study_pk == Study.id)
    .where(
        Series.partition == bindparam("partition"),
        Series.series_instance_uid == bindparam("series_uid"),
        Study.study_instance_uid == bindparam("study_uid"),
    )
)
_TOUCH_STUDY = (
    update(Study).where(Study.id == bindparam("study_pk")).values(last_instance_at=bindparam("now"))
)


def _store(
    archive: Archive,
    path: Path,
    header: InstanceHeader,
    digest: str,
    size: int,
    origin: Origin,
    temporary: bool,
) -> IngestResult:
    partition = archive.partition
    with archive.index.read() as session:
        existing = (
            session.connection()
            .execute(
                _EXISTING_INSTANCE,
                {"partition": partition, "sop_instance_uid": header.sop_instance_uid},
            )
            .one_or_none()
        )

    def result(outcome: IngestOutcome) -> IngestResult:
        return IngestResult(outcome, header.sop_instance_uid, header.study_instance_uid, digest)

    if existing is not None and existing.sha256 == digest:
        return result(IngestOutcome.DUPLICATE)
    if existing is not None and archive.on_duplicate == "keep":
        log.info("kept stored %s, discarded different re-sent content", header.sop_instance_uid)
        return result(IngestOutcome.KEPT_EXISTING)

    key = archive.blob_key(header, digest)
    # Everything but the series' primary key, before the write transaction: on SQLite it holds
    # the one write lock, which every other association waits for.
    values = _instance_values(header, key, digest, size, origin)
    archive.blobs.put(key, path, may_link=temporary)
    try:
        with archive.index.write() as session:
            connection = session.connection()
            values["series_pk"] = _upsert_hierarchy(connection, partition, header.dataset)
            if existing is None:
                connection.execute(_INSERT_INSTANCE, {"partition": partition, **values})
            else:
                rows = connection.execute(
                    _REPLACE_INSTANCE,
                    {"existing_id": existing.id, "existing_sha": existing.sha256, **values},
                ).rowcount
                if rows != 1:
                    raise _ConcurrentChange(header.sop_instance_uid)
    except BaseException:
        _discard_unreferenced(archive, key)
        raise

    if existing is None:
        return result(IngestOutcome.STORED)
    if existing.blob_key != key:
        _delete_quietly(archive, existing.blob_key)
    return result(IngestOutcome.REPLACED)


def _discard_unreferenced(archive: Archive, key: str) -> None:
    """Remove a blob whose index transaction failed, unless a committed row uses it (a
    concurrent sender of the same content won the race and stored the same key)."""
    delete_blob_unless_referenced(archive, key)


def _delete_quietly(archive: Archive, key: str) -> None:
    try:
        archive.blobs.delete(key)
    except StorageUnavailable:
        log.warning("could not delete blob %s; `hilum verify` will report it as an orphan", key)


def _text(dataset: Dataset, keyword: str, max_length: int) -> str:
    value = dataset.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).replace("\x00", "").strip()[:max_length]


def _integer(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _insert_ignoring_conflict(connection: Connection, model: type, values: dict[str, Any]) -> None:
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    connection.execute(dialect.insert(model).values(**values).on_conflict_do_nothing())


def _upsert_hierarchy(connection: Connection, partition: str, ds: Dataset) -> int:
    """Patient, study and series rows for ``ds``; returns the series' primary key."""
    now = datetime.now(UTC)
    study_uid = str(ds.StudyInstanceUID)[:UI]
    series_uid = str(ds.SeriesInstanceUID)[:UI]
    # The common case, every instance of a series but its first: the rows exist, and only the
    # study's last_instance_at moves. One SELECT and one UPDATE instead of seven statements.
    known_series = connection.execute(
        _KNOWN_SERIES, {"partition": partition, "series_uid": series_uid, "study_uid": study_uid}
    ).one_or_none()
    if known_series is not None:
        series_pk, study_pk = known_series
        connection.execute(_TOUCH_STUDY, {"study_pk": study_pk, "now": now})
        return int(series_pk)

    patient = {
        "patient_id": _text(ds, "PatientID", 64),
        "issuer_of_patient_id": _text(ds, "IssuerOfPatientID", 64),
    }
    patient_name = _text(ds, "PatientName", 324)
    _insert_ignoring_conflict(
        connection,
        Patient,
        {
            "partition": partition,
            **patient,
            "patient_name": patient_name,
            "patient_name_upper": patient_name.upper(),
            "patient_birth_date": _text(ds, "PatientBirthDate", 8),
            "patient_sex": _text(ds, "PatientSex", 16),
        },
    )
    patient_pk = connection.execute(
        select(Patient.id).filter_by(partition=partition, **patient)
    ).scalar_one()

    _insert_ignoring_conflict(
        connection,
        Study,
        {
            "partition": partition,
            "patient_pk": patient_pk,
            "study_instance_uid": study_uid,
            "study_date": _text(ds, "StudyDate", 8),
            "study_time": _text(ds, "StudyTime", 16),
            "accession_number": _text(ds, "AccessionNumber", 16),
            "study_id": _text(ds, "StudyID", 16),
            "study_description": _text(ds, "StudyDescription", 64),
            "referring_physician_name": _text(ds, "ReferringPhysicianName", 324),
            "created_at": now,
            "last_instance_at": now,
        },
    )
    # Locks the study row on PostgreSQL, so concurrent series updates of
    # ModalitiesInStudy serialise instead of losing one another's modality.
    study_pk, modalities = connection.execute(
        select(Study.id, Study.modalities_in_study)
        .filter_by(partition=partition, study_instance_uid=study_uid)
        .with_for_update()
    ).one()

    modality = _text(ds, "Modality", 16)
    _insert_ignoring_conflict(
        connection,
        Series,
        {
            "partition": partition,
            "study_pk": study_pk,
            "series_instance_uid": series_uid,
            "modality": modality,
            "series_number": _integer(ds, "SeriesNumber"),
            "series_description": _text(ds, "SeriesDescription", 64),
            "body_part_examined": _text(ds, "BodyPartExamined", 16),
            "series_date": _text(ds, "SeriesDate", 8),
            "series_time": _text(ds, "SeriesTime", 16),
        },
    )
    series_pk = connection.execute(
        select(Series.id).filter_by(partition=partition, series_instance_uid=series_uid)
    ).scalar_one()

    study_values: dict[str, Any] = {"last_instance_at": now}
    known = [m for m in modalities.split("\\") if m]
    if modality and modality not in known:
        study_values["modalities_in_study"] = "\\".join(sorted([*known, modality]))[:255]
    connection.execute(update(Study).where(Study.id == study_pk).values(**study_values))
    return series_pk


def _instance_values(
    header: InstanceHeader, key: str, digest: str, size: int, origin: Origin
) -> dict[str, Any]:
    """Every column of the instance row but ``partition`` and ``series_pk``."""
    return {
        "sop_instance_uid": header.sop_instance_uid,
        "sop_class_uid": header.sop_class_uid,
        "instance_number": _integer(header.dataset, "InstanceNumber"),
        "number_of_frames": header.number_of_frames,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "blob_key": key,
        "size": size,
        "sha256": digest,
        "calling_ae_title": origin.calling_ae_title[:16],
        "received_at": datetime.now(UTC),
        "metadata_json": metadata_json(header.dataset, header.has_pixel_data),
        "frame_ranges": header.frame_ranges,
    }
