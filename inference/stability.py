"""Study stability: a study with no new instance for ``[inference] stable_after_s`` seconds is
stable, and the jobs the rules pick for its series are queued in the transaction that marks it so.
Sooner, with ``[inference] announced_completion``: a study whose every series holds as many
instances as the modality announced in Images in Acquisition (0020,1002) is stable at once; the
quiet period stays the rule for series that announce nothing (and for Hilum's own results).

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
The SQL of all this is in ``storage/stability.py``; the scan and the rules are here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from config import Settings
from inference.rules import models_for_series, series_for_model_by_hand, why_no_model
from storage.archive import Archive
from storage.errors import Conflict, StorageUnavailable
from storage.events import EventType, NewEvent, record_events
from storage.index.models import InferenceJob
from storage.jobs import Job, as_utc, enqueue, job_event, utc_now
from storage.partitions import partition_names
from storage.research_copies import queue_copy_jobs
from storage.stability import (
    announced_complete_studies,
    completed_step_studies,
    lock_newly_stable,
    mark_stable,
    newly_stable_studies,
    series_groups,
    study_jobs,
    study_priority,
    study_series_groups,
)

if TYPE_CHECKING:
    from inference.registry import Model

log = logging.getLogger(__name__)


def queue_stable_studies(
    archive: Archive,
    settings: Settings,
    models: Sequence[Model],
    *,
    now: datetime | None = None,
    limit: int = 50,
) -> list[Job]:
    """Mark up to ``limit`` newly stable studies of each partition stable and queue their jobs
    (in the study's partition, whatever ``archive``'s); the jobs queued.

    A study whose jobs cannot be queued (an unexpected error) is logged and skipped; a database
    that cannot be reached (:class:`StorageUnavailable`) ends the scan."""
    now = now or utc_now()
    cutoff = now - timedelta(seconds=settings.inference.stable_after_s)
    # Every partition's studies, each scan (a partition's jobs and results stay in it); one
    # indexed query per partition (ix_study_last_instance leads with the partition). Quiet for
    # stable_after_s; or, sooner, every series complete as its modality announced.
    candidates = []
    for partition in partition_names(archive.index):
        scoped = archive.scoped(partition)
        candidates += [
            (scoped, pk, uid, cutoff) for pk, uid in newly_stable_studies(scoped, cutoff, limit)
        ]
        if settings.inference.announced_completion:
            announced = announced_complete_studies(scoped, cutoff, limit)
            announced += completed_step_studies(scoped, cutoff, limit)
            candidates += [(scoped, pk, uid, now) for pk, uid in dict.fromkeys(announced)]
    queued: list[Job] = []
    for scoped, study_pk, study_uid, study_cutoff in candidates:
        try:
            queued += _queue_if_stable(scoped, settings, models, study_pk, study_cutoff)
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
        study = lock_newly_stable(session, archive.partition, study_pk, cutoff)
        if study is None:
            return []
        study_uid, last_instance_at = study
        rows = _queue_study(session, archive.partition, settings, models, study_pk, study_uid)
        note = "" if rows else _no_model_note(session, settings, models, study_pk)
        # [[research.copies]] whose `when` the study meets now: queued with its model jobs.
        rows += queue_copy_jobs(
            session,
            archive.partition,
            settings.research.copies,
            study_uid,
            last_instance_at,
            utc_now(),
        )
        mark_stable(session, study_pk, last_instance_at, note)
        jobs = [Job.from_row(row) for row in rows]
        stable = NewEvent(
            EventType.STUDY_STABLE,
            study_uid,
            {
                "last_instance_at": as_utc(last_instance_at).isoformat(),  # type: ignore[union-attr]
                "jobs": [job.id for job in jobs],
                "ai_note": note or None,
            },
        )
        # The outbox: the study's event and its jobs', committed with them (last statement).
        record_events(session, archive.partition, [stable, *(job_event(row) for row in rows)])
        return jobs


def _no_model_note(
    session: Session, settings: Settings, models: Sequence[Model], study_pk: int
) -> str:
    """Why no model applies to any of the study's series (received ones, not Hilum's own
    results), series by series; "" when one does (its job stands) or there is no such series."""
    notes = []
    for group in series_groups(session, study_pk, settings.dimse.ae_title):
        if not group.external:
            continue
        series = {
            "Modality": group.modality,
            "SOPClassUID": group.sop_class_uid,
            "BodyPartExamined": group.body_part_examined,
        }
        why = why_no_model(settings.inference.rules, models, series)
        if not why:
            return ""
        part = f", body part {group.body_part_examined}" if group.body_part_examined else ""
        notes.append(f"{group.modality or 'series'} series{part}: {why}")
    return ". ".join(dict.fromkeys(notes))


def _queue_study(
    session: Session,
    partition: str,
    settings: Settings,
    models: Sequence[Model],
    study_pk: int,
    study_uid: str,
) -> list[InferenceJob]:
    wanted: dict[tuple[str, str], Model] = {}
    newest: dict[str, datetime] = {}
    for group in series_groups(session, study_pk, settings.dimse.ae_title):
        uid, received = group.series_instance_uid, group.newest_received_at
        newest[uid] = max(received, newest.get(uid, received))
        if not group.external:
            continue  # only Hilum's own results
        series = {
            "Modality": group.modality,
            "SOPClassUID": group.sop_class_uid,
            "BodyPartExamined": group.body_part_examined,
        }
        for model in models_for_series(settings.inference.rules, models, series):
            wanted[(uid, model.name)] = model
    if not wanted:
        return []

    existing = study_jobs(session, partition, study_uid)
    priority = study_priority(session, settings.inference.priority, study_pk)
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


def queue_model_by_hand(
    archive: Archive, settings: Settings, model: Model, study_instance_uid: str
) -> list[Job]:
    """Queue ``model`` on the study's received series that it can read
    (:func:`inference.rules.series_for_model_by_hand`), ignoring the rules; the jobs queued
    (re-queued as their next generation if they existed). :class:`NotFound` for an unknown
    study, :class:`Conflict` when the model can read none of its series."""
    study_pk, groups = study_series_groups(archive, study_instance_uid, settings.dimse.ae_title)
    received = [
        {
            "SeriesInstanceUID": g.series_instance_uid,
            "Modality": g.modality,
            "SOPClassUID": g.sop_class_uid,
            "BodyPartExamined": g.body_part_examined,
        }
        for g in groups
        if g.external
    ]
    chosen = series_for_model_by_hand(model, received)
    if not chosen:
        wanted = model.manifest.applies_to
        raise Conflict(
            f"{model.name} reads {'/'.join(wanted.modalities) or 'any modality'} series of SOP "
            f"class {'/'.join(wanted.sop_class_uids) or 'any'}; this study has none"
        )
    newest = {g.series_instance_uid: g.newest_received_at for g in groups}
    now = utc_now()
    with archive.index.write() as session:
        priority = study_priority(session, settings.inference.priority, study_pk)
        rows = [
            enqueue(
                session,
                archive.partition,
                study_instance_uid=study_instance_uid,
                series_instance_uid=series["SeriesInstanceUID"],
                model_name=model.name,
                model_version=model.version,
                priority=priority,
                input_received_at=newest[series["SeriesInstanceUID"]],
                now=now,
            )
            for series in {s["SeriesInstanceUID"]: s for s in chosen}.values()
        ]
        jobs = [Job.from_row(row) for row in rows]
        record_events(session, archive.partition, [job_event(row) for row in rows])
    log.info("study %s: %s queued by hand on %d series", study_instance_uid, model.name, len(jobs))
    return jobs
