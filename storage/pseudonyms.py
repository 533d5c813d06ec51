"""The way back from a de-identified study to its original, kept in the clinical partition.

Every de-identified export or copy of a study records one ``deidentified_study`` row in the
partition the original lives in: project, original patient (Issuer of Patient ID, Patient ID),
original Study Instance UID, the pseudonym, the new Study Instance UID and the date shift. A
table rather than a derivation from the project's secret: the secret alone cannot invert a
pseudonym (an HMAC), and the table still answers after a secret is rotated. The rows are read
only by :func:`identities` (behind ``GET /api/research/identities``, admin only); no research
partition holds any of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from storage.index.models import DeidentifiedStudy
from storage.jobs import as_utc, utc_now

if TYPE_CHECKING:
    from datetime import datetime

    from storage.archive import Archive
    from storage.deidentify import Deidentified


@dataclass(frozen=True)
class Identity:
    project: str
    patient_id: str
    issuer_of_patient_id: str
    study_instance_uid: str
    pseudonym: str
    deidentified_study_uid: str
    date_shift_days: int
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "PatientID": self.patient_id,
            "IssuerOfPatientID": self.issuer_of_patient_id,
            "StudyInstanceUID": self.study_instance_uid,
            "pseudonym": self.pseudonym,
            "deidentified_StudyInstanceUID": self.deidentified_study_uid,
            "date_shift_days": self.date_shift_days,
            "created_at": self.created_at.isoformat(),
        }


def record_deidentified_study(archive: Archive, project: str, done: Deidentified) -> None:
    """Remember ``done`` in ``archive``'s partition (the original's); once per study."""
    with archive.index.write() as session:
        exists = session.scalar(
            select(DeidentifiedStudy.id).where(
                DeidentifiedStudy.partition == archive.partition,
                DeidentifiedStudy.project == project,
                DeidentifiedStudy.study_instance_uid == done.original_study_instance_uid,
            )
        )
        if exists is not None:
            return
        session.add(
            DeidentifiedStudy(
                partition=archive.partition,
                project=project,
                patient_id=done.original.patient_id,
                issuer_of_patient_id=done.original.issuer,
                study_instance_uid=done.original_study_instance_uid,
                pseudonym=done.pseudonym,
                deidentified_study_uid=done.study_instance_uid,
                date_shift_days=done.date_shift_days,
                created_at=utc_now(),
            )
        )


def identities(
    archive: Archive,
    *,
    project: str | None = None,
    pseudonym: str | None = None,
    deidentified_study_uid: str | None = None,
    limit: int = 1000,
) -> list[Identity]:
    """The originals behind a pseudonym or a de-identified study (in ``archive``'s partition)."""
    statement = select(DeidentifiedStudy).where(DeidentifiedStudy.partition == archive.partition)
    if project:
        statement = statement.where(DeidentifiedStudy.project == project)
    if pseudonym:
        statement = statement.where(DeidentifiedStudy.pseudonym == pseudonym)
    if deidentified_study_uid:
        statement = statement.where(
            DeidentifiedStudy.deidentified_study_uid == deidentified_study_uid
        )
    statement = statement.order_by(DeidentifiedStudy.id).limit(max(1, min(limit, 10_000)))
    with archive.index.read() as session:
        return [
            Identity(
                project=row.project,
                patient_id=row.patient_id,
                issuer_of_patient_id=row.issuer_of_patient_id,
                study_instance_uid=row.study_instance_uid,
                pseudonym=row.pseudonym,
                deidentified_study_uid=row.deidentified_study_uid,
                date_shift_days=row.date_shift_days,
                created_at=as_utc(row.created_at),  # type: ignore[arg-type]
            )
            for row in session.scalars(statement)
        ]
