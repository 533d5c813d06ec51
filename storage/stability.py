"""The study-stability SQL of the AI side: which studies are newly stable, locking and marking
one, the facts about its series that the rules (``inference/rules.py``) decide on, its jobs, and
whether it is STAT. ``inference/stability.py`` holds the scan that uses them and the rules.

A study is marked stable by copying its ``last_instance_at`` into ``stable_last_instance_at``;
a new instance changes ``last_instance_at`` and so makes the study unstable again. On
PostgreSQL the study row is locked ``FOR UPDATE SKIP LOCKED``, so concurrent scans share the work
and an ingest in progress (which locks its study row) is skipped until it commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from config.settings import InferencePriority
from storage.errors import NotFound
from storage.index.models import InferenceJob, Instance, PerformedProcedureStep, Series, Study
from storage.jobs import as_utc

if TYPE_CHECKING:
    from storage.archive import Archive

# DICOM JSON tags (PS3.18 F.2) read for priority: Requested Procedure Priority (0040,1003),
# at the top level or in the Request Attributes Sequence (0040,0275).
_REQUESTED_PROCEDURE_PRIORITY = "00401003"
_REQUEST_ATTRIBUTES_SEQUENCE = "00400275"


@dataclass(frozen=True)
class SeriesGroup:
    """The instances of one series with one SOP class, as the rules see them."""

    series_instance_uid: str
    modality: str
    body_part_examined: str
    sop_class_uid: str
    newest_received_at: datetime
    external: bool  # False: every instance came from Hilum's own AE title (its results)


def _newly_stable(partition: str, cutoff: datetime) -> Any:
    return and_(
        Study.partition == partition,
        Study.last_instance_at <= cutoff,
        or_(
            Study.stable_last_instance_at.is_(None),
            Study.stable_last_instance_at != Study.last_instance_at,
        ),
    )


def newly_stable_studies(archive: Archive, cutoff: datetime, limit: int) -> list[tuple[int, str]]:
    """(row id, StudyInstanceUID) of up to ``limit`` studies with no new instance since
    ``cutoff`` that are not marked stable at their last instance, oldest first."""
    with archive.index.read() as session:
        rows = session.execute(
            select(Study.id, Study.study_instance_uid)
            .where(_newly_stable(archive.partition, cutoff))
            .order_by(Study.last_instance_at)
            .limit(limit)
        ).all()
    return [(pk, uid) for pk, uid in rows]


# Images in Acquisition (0020,1002), PS3.3 C.7.3.1: how many images the acquisition produced.
_IMAGES_IN_ACQUISITION = "00201002"


def announced_complete_studies(
    archive: Archive, cutoff: datetime, limit: int
) -> list[tuple[int, str]]:
    """(row id, StudyInstanceUID) of up to ``limit`` studies received into since ``cutoff``
    (the quiet rule has not made them stable yet) whose every series holds as many instances
    as its first instance announces in Images in Acquisition (0020,1002): the modality said
    how many to expect, and all arrived. Newest first."""
    found = []
    with archive.index.read() as session:
        recent = session.execute(
            select(Study.id, Study.study_instance_uid)
            .where(
                Study.partition == archive.partition,
                Study.last_instance_at > cutoff,
                or_(
                    Study.stable_last_instance_at.is_(None),
                    Study.stable_last_instance_at != Study.last_instance_at,
                ),
            )
            .order_by(Study.last_instance_at.desc())
            .limit(limit)
        ).all()
        for study_pk, study_uid in recent:
            series = session.execute(
                select(func.count(Instance.id), func.min(Instance.id))
                .join(Series, Instance.series_pk == Series.id)
                .where(Series.study_pk == study_pk)
                .group_by(Series.id)
            ).all()
            complete = bool(series)
            for count, first in series:
                metadata = session.scalar(
                    select(Instance.metadata_json).where(Instance.id == first)
                )
                announced = _announced_images(metadata or {})
                if announced is None or count < announced:
                    complete = False
                    break
            if complete:
                found.append((study_pk, study_uid))
    return found


def completed_step_studies(archive: Archive, cutoff: datetime, limit: int) -> list[tuple[int, str]]:
    """(row id, StudyInstanceUID) of up to ``limit`` studies not stable at their last
    instance, with a Modality Performed Procedure Step COMPLETED since ``cutoff`` whose
    referenced images (PS3.3 C.4.15, Performed Series Sequence) are all stored."""
    found = []
    with archive.index.read() as session:
        steps = session.execute(
            select(Study.id, Study.study_instance_uid, PerformedProcedureStep.series)
            .join(
                Study,
                (Study.partition == PerformedProcedureStep.partition)
                & (Study.study_instance_uid == PerformedProcedureStep.study_instance_uid),
            )
            .where(
                PerformedProcedureStep.partition == archive.partition,
                PerformedProcedureStep.status == "COMPLETED",
                PerformedProcedureStep.updated_at > cutoff,
                or_(
                    Study.stable_last_instance_at.is_(None),
                    Study.stable_last_instance_at != Study.last_instance_at,
                ),
            )
            .order_by(PerformedProcedureStep.updated_at.desc())
            .limit(limit)
        ).all()
        for study_pk, study_uid, series in steps:
            expected = {uid for uids in (series or {}).values() for uid in uids}
            if not expected or (study_pk, study_uid) in found:
                continue
            stored = session.scalar(
                select(func.count(Instance.id))
                .join(Series, Instance.series_pk == Series.id)
                .where(
                    Series.study_pk == study_pk,
                    Instance.sop_instance_uid.in_(sorted(expected)),
                )
            )
            if stored == len(expected):
                found.append((study_pk, study_uid))
    return found


def _announced_images(metadata: dict[str, Any]) -> int | None:
    values = metadata.get(_IMAGES_IN_ACQUISITION, {}).get("Value") or []
    try:
        announced = int(values[0])
    except (IndexError, TypeError, ValueError):
        return None
    return announced if announced > 0 else None


def lock_newly_stable(
    session: Session, partition: str, study_pk: int, cutoff: datetime
) -> tuple[str, datetime] | None:
    """In the caller's write transaction: the study's UID and ``last_instance_at``, its row
    locked, if it is still newly stable and no other scan or ingest holds it; else None."""
    row = session.execute(
        select(Study.study_instance_uid, Study.last_instance_at)
        .where(Study.id == study_pk, _newly_stable(partition, cutoff))
        .with_for_update(skip_locked=True)
    ).one_or_none()
    return None if row is None else (row[0], row[1])


def mark_stable(
    session: Session, study_pk: int, last_instance_at: datetime, ai_note: str = ""
) -> None:
    """Mark the study stable at ``last_instance_at``, with why no model applies (if so)."""
    session.execute(
        update(Study)
        .where(Study.id == study_pk)
        .values(stable_last_instance_at=last_instance_at, ai_note=ai_note[:4000])
    )


def series_groups(session: Session, study_pk: int, own_ae_title: str) -> list[SeriesGroup]:
    """One group per (series, SOP class) of the study: a series normally holds one class."""
    rows = session.execute(
        select(
            Series.series_instance_uid,
            Series.modality,
            Series.body_part_examined,
            Instance.sop_class_uid,
            func.max(Instance.received_at),
            func.max(case((Instance.calling_ae_title != own_ae_title, 1), else_=0)),
        )
        .join(Instance, Instance.series_pk == Series.id)
        .where(Series.study_pk == study_pk)
        .group_by(
            Series.id,
            Series.series_instance_uid,
            Series.modality,
            Series.body_part_examined,
            Instance.sop_class_uid,
        )
        .order_by(Series.id)
    ).all()
    return [
        SeriesGroup(uid, modality, body_part, sop_class, as_utc(received), bool(external))  # type: ignore[arg-type]
        for uid, modality, body_part, sop_class, received, external in rows
    ]


def study_series_groups(
    archive: Archive, study_instance_uid: str, own_ae_title: str
) -> tuple[int, list[SeriesGroup]]:
    """The study's row id and :func:`series_groups`, read on their own (a model run by hand);
    :class:`NotFound` when the study is not in the archive."""
    with archive.index.read() as session:
        study_pk = session.scalar(
            select(Study.id).where(
                Study.partition == archive.partition,
                Study.study_instance_uid == study_instance_uid,
            )
        )
        if study_pk is None:
            raise NotFound(f"no study {study_instance_uid} in this archive")
        return study_pk, series_groups(session, study_pk, own_ae_title)


def study_jobs(
    session: Session, partition: str, study_instance_uid: str
) -> dict[tuple[str, str], InferenceJob]:
    """The study's job rows by (SeriesInstanceUID, model name)."""
    return {
        (row.series_instance_uid, row.model_name): row
        for row in session.scalars(
            select(InferenceJob).where(
                InferenceJob.partition == partition,
                InferenceJob.study_instance_uid == study_instance_uid,
            )
        )
    }


def study_priority(session: Session, rules: InferencePriority, study_pk: int) -> int:
    """``stat_priority`` for a STAT study (by calling AE title, or by Requested Procedure
    Priority in the first instance of any series), else 0."""
    instances = (
        select(Instance.calling_ae_title, Instance.metadata_json)
        .join(Series, Instance.series_pk == Series.id)
        .where(Series.study_pk == study_pk)
    )
    if rules.stat_calling_ae_titles:
        stat_sender = session.execute(
            instances.with_only_columns(Instance.id)
            .where(Instance.calling_ae_title.in_(rules.stat_calling_ae_titles))
            .limit(1)
        ).first()
        if stat_sender is not None:
            return rules.stat_priority
    stat = {value.strip().upper() for value in rules.stat_requested_procedure_priorities}
    if stat:
        first_of_series = (
            select(func.min(Instance.id))
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.study_pk == study_pk)
            .group_by(Series.id)
        )
        for (metadata,) in session.execute(
            select(Instance.metadata_json).where(Instance.id.in_(first_of_series))
        ):
            if _requested_priorities(metadata) & stat:
                return rules.stat_priority
    return 0


def _requested_priorities(metadata: dict[str, Any]) -> set[str]:
    items = [metadata, *metadata.get(_REQUEST_ATTRIBUTES_SEQUENCE, {}).get("Value", [])]
    return {
        str(value).strip().upper()
        for item in items
        if isinstance(item, dict)
        for value in item.get(_REQUESTED_PROCEDURE_PRIORITY, {}).get("Value", [])
    }
