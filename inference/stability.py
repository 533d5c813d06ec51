"""Study stability: a study with no new instance for ``[inference] stable_after_s`` seconds is
stable, and the jobs the rules pick for its series are queued in the transaction that marks it so.

A study is marked stable by copying its ``last_instance_at`` into ``stable_last_instance_at``;
a new instance changes ``last_instance_at`` and so makes the study unstable again. When it is
stable again, a (series, model) job is queued again only if the series received an instance
since the job was last queued, so results stored into the study (which make it unstable too)
never re-trigger the model that made them. Series made only of Hilum's own results (stored with
Hilum's AE title as their origin) are never analysed, so no model feeds on its own output.

Every worker runs the scan, and queues jobs for the models it has itself: every worker that scans
must have the same ``models_dirs``. Each study is handled in a write transaction of its own, so
an error in one study is logged and cannot keep the others from being queued (the failed study is
tried again at the next scan). On PostgreSQL the study row is locked ``FOR UPDATE SKIP LOCKED``,
so concurrent scans share the work and an ingest in progress (which locks its study row) is
skipped until it commits; on SQLite each study's transaction is a ``BEGIN IMMEDIATE`` one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from config import Settings
from inference.rules import models_for_series
from storage.archive import Archive
from storage.errors import StorageUnavailable
from storage.index.models import InferenceJob, Instance, Series, Study
from storage.jobs import Job, as_utc, enqueue, utc_now

if TYPE_CHECKING:
    from inference.registry import Model

log = logging.getLogger(__name__)

# DICOM JSON tags (PS3.18 F.2) read for priority: Requested Procedure Priority (0040,1003),
# at the top level or in the Request Attributes Sequence (0040,0275).
_REQUESTED_PROCEDURE_PRIORITY = "00401003"
_REQUEST_ATTRIBUTES_SEQUENCE = "00400275"


def queue_stable_studies(
    archive: Archive,
    settings: Settings,
    models: Sequence[Model],
    *,
    now: datetime | None = None,
    limit: int = 50,
) -> list[Job]:
    """Mark up to ``limit`` newly stable studies stable and queue their jobs; the jobs queued.

    A study whose jobs cannot be queued (an unexpected error) is logged and skipped; a database
    that cannot be reached (:class:`StorageUnavailable`) ends the scan."""
    now = now or utc_now()
    cutoff = now - timedelta(seconds=settings.inference.stable_after_s)
    with archive.index.read() as session:
        candidates = session.execute(
            select(Study.id, Study.study_instance_uid)
            .where(_newly_stable(archive.partition, cutoff))
            .order_by(Study.last_instance_at)
            .limit(limit)
        ).all()
    queued: list[Job] = []
    for study_pk, study_uid in candidates:
        try:
            queued += _queue_if_stable(archive, settings, models, study_pk, cutoff)
        except StorageUnavailable:
            raise
        except Exception:
            log.exception(
                "study %s: its AI jobs could not be queued; tried again at the next scan",
                study_uid,
            )
    for job in queued:
        log.info(
            "study %s stable: queued %s on series %s (priority %d)",
            job.study_instance_uid,
            job.model_name,
            job.series_instance_uid,
            job.priority,
        )
    return queued


def _newly_stable(partition: str, cutoff: datetime) -> Any:
    return and_(
        Study.partition == partition,
        Study.last_instance_at <= cutoff,
        or_(
            Study.stable_last_instance_at.is_(None),
            Study.stable_last_instance_at != Study.last_instance_at,
        ),
    )


def _queue_if_stable(
    archive: Archive,
    settings: Settings,
    models: Sequence[Model],
    study_pk: int,
    cutoff: datetime,
) -> list[Job]:
    """In one write transaction: lock the study if it is still newly stable (not taken by
    another scan, not being ingested into), queue its jobs, mark it stable."""
    with archive.index.write() as session:
        study = session.execute(
            select(Study.study_instance_uid, Study.last_instance_at)
            .where(Study.id == study_pk, _newly_stable(archive.partition, cutoff))
            .with_for_update(skip_locked=True)
        ).one_or_none()
        if study is None:
            return []
        study_uid, last_instance_at = study
        rows = _queue_study(session, archive.partition, settings, models, study_pk, study_uid)
        session.execute(
            update(Study)
            .where(Study.id == study_pk)
            .values(stable_last_instance_at=last_instance_at)
        )
        return [Job.from_row(row) for row in rows]


def _queue_study(
    session: Session,
    partition: str,
    settings: Settings,
    models: Sequence[Model],
    study_pk: int,
    study_uid: str,
) -> list[InferenceJob]:
    own_ae_title = settings.dimse.ae_title
    # One row per (series, SOP class): a series normally holds one SOP class.
    groups = session.execute(
        select(
            Series.id,
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
    wanted: dict[tuple[str, str], Model] = {}
    newest: dict[str, datetime] = {}
    for _pk, series_uid, modality, body_part, sop_class, received, external in groups:
        received = as_utc(received)
        newest[series_uid] = max(received, newest.get(series_uid, received))
        if not external:
            continue  # only Hilum's own results
        series = {"Modality": modality, "SOPClassUID": sop_class, "BodyPartExamined": body_part}
        for model in models_for_series(settings.inference.rules, models, series):
            wanted[(series_uid, model.name)] = model
    if not wanted:
        return []

    existing = {
        (row.series_instance_uid, row.model_name): row
        for row in session.scalars(
            select(InferenceJob).where(
                InferenceJob.partition == partition,
                InferenceJob.study_instance_uid == study_uid,
            )
        )
    }
    priority = _priority(session, settings, study_pk)
    now = utc_now()
    rows = []
    for (series_uid, name), model in wanted.items():
        input_received_at = newest[series_uid]
        job = existing.get((series_uid, name))
        if (
            job is not None
            and as_utc(job.input_received_at) >= input_received_at  # type: ignore[operator]
            and job.model_version == model.version
        ):
            continue  # same input, same model: its results stand
        rows.append(
            enqueue(
                session,
                partition,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                model_name=name,
                model_version=model.version,
                priority=priority,
                input_received_at=input_received_at,
                now=now,
            )
        )
    return rows


def _priority(session: Session, settings: Settings, study_pk: int) -> int:
    """``stat_priority`` for a STAT study (by calling AE title, or by Requested Procedure
    Priority in the first instance of any series), else 0."""
    rules = settings.inference.priority
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
