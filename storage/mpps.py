"""Modality Performed Procedure Steps (PS3.4 Annex F.7) as the index keeps them: what a modality
says it performed, and whether it is done. Only what Hilum uses is kept: the status, the study,
and the series with the SOP Instance UIDs of their images. A step ``COMPLETED`` whose images are
all stored makes its study stable at once (``storage/stability.py``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select

from storage.errors import Conflict, NotFound
from storage.index.models import PerformedProcedureStep

if TYPE_CHECKING:
    from storage.archive import Archive


class StepStatus(enum.StrEnum):
    # PS3.3 C.4.14: Performed Procedure Step Status (0040,0252).
    IN_PROGRESS = "IN PROGRESS"
    DISCONTINUED = "DISCONTINUED"
    COMPLETED = "COMPLETED"


@dataclass(frozen=True)
class PerformedStep:
    sop_instance_uid: str
    status: StepStatus
    study_instance_uid: str
    series: dict[str, list[str]]  # SeriesInstanceUID -> SOP Instance UIDs of its images


def create_step(
    archive: Archive, step: PerformedStep, calling_ae_title: str, now: datetime
) -> None:
    """Record a new step; :class:`Conflict` when one with its SOP Instance UID exists."""
    with archive.index.write() as session:
        exists = session.scalar(
            select(PerformedProcedureStep.id).where(
                PerformedProcedureStep.partition == archive.partition,
                PerformedProcedureStep.sop_instance_uid == step.sop_instance_uid,
            )
        )
        if exists is not None:
            raise Conflict(f"performed procedure step {step.sop_instance_uid} exists")
        session.add(
            PerformedProcedureStep(
                partition=archive.partition,
                sop_instance_uid=step.sop_instance_uid,
                status=step.status.value,
                study_instance_uid=step.study_instance_uid,
                series=step.series,
                calling_ae_title=calling_ae_title[:16],
                created_at=now,
                updated_at=now,
            )
        )


def update_step(
    archive: Archive,
    sop_instance_uid: str,
    *,
    status: StepStatus | None,
    study_instance_uid: str | None,
    series: dict[str, list[str]] | None,
    now: datetime,
) -> PerformedStep:
    """Apply an N-SET: :class:`NotFound` for an unknown step, :class:`Conflict` once it is
    COMPLETED or DISCONTINUED (PS3.4 F.7.2.2: it may no longer be updated)."""
    with archive.index.write() as session:
        row = session.scalars(
            select(PerformedProcedureStep)
            .where(
                PerformedProcedureStep.partition == archive.partition,
                PerformedProcedureStep.sop_instance_uid == sop_instance_uid,
            )
            .with_for_update()
        ).one_or_none()
        if row is None:
            raise NotFound(f"no performed procedure step {sop_instance_uid}")
        if row.status != StepStatus.IN_PROGRESS:
            raise Conflict(f"performed procedure step {sop_instance_uid} is {row.status}")
        if status is not None:
            row.status = status.value
        if study_instance_uid:
            row.study_instance_uid = study_instance_uid
        if series is not None:
            row.series = series
        row.updated_at = now
        session.flush()
        return PerformedStep(
            row.sop_instance_uid, StepStatus(row.status), row.study_instance_uid, dict(row.series)
        )
