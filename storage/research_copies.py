"""Research copies (``[[research.copies]]``): which studies of a partition to copy, and the copy.

A rule's studies are queued as jobs of the AI worker's queue (``storage.jobs``), one per study,
named after the rule (``research-copy:<project>:<to>``) in place of a model, in the ``from``
partition: claimed, leased and retried like a model's job. A study is due once it is stable (no
new instance for ``[inference] stable_after_s``), matches the rule's ``when`` and has no copy
job at its current ``last_instance_at``; so a study that receives more (the AI's SEG and SR, a
review) is copied again, under the same new UIDs (the copy replaces, never duplicates).

The copy reads each instance from the blob store, de-identifies it (``storage.deidentify``;
held-back instances stay behind), stores it into the ``to`` partition through ``storage.ingest``,
and carries the study's AI job results, findings and review decisions over as index rows under
the new UIDs (reviewer names and comments stay behind). The way back is recorded in the
``from`` partition only (``storage.pseudonyms``).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import and_, delete, exists, select

from storage.deidentify import Deidentifier, HeldBack
from storage.errors import NotFound
from storage.export import write_deidentified
from storage.index.models import (
    AIFinding,
    FindingReview,
    InferenceJob,
    Partition,
    Study,
)
from storage.ingest import Origin, ingest_file
from storage.jobs import Job, JobState, enqueue, job_key
from storage.pseudonyms import record_deidentified_study
from storage.query import entity_query, locate_instances

if TYPE_CHECKING:
    from config.settings import ResearchCopy
    from storage.archive import Archive

log = logging.getLogger(__name__)
COPY_JOB_PREFIX = "research-copy:"


def is_copy_job(model_name: str) -> bool:
    return model_name.startswith(COPY_JOB_PREFIX)


def _due(partition: str, rule: ResearchCopy, cutoff: datetime):  # type: ignore[no-untyped-def]
    copied = exists().where(
        InferenceJob.partition == partition,
        InferenceJob.model_name == rule.job_name,
        InferenceJob.series_instance_uid == Study.study_instance_uid,
        InferenceJob.input_received_at >= Study.last_instance_at,
    )
    statement = select(Study.id, Study.study_instance_uid, Study.last_instance_at).where(
        Study.partition == partition, Study.last_instance_at <= cutoff, ~copied
    )
    if rule.when == "ai-positive":
        statement = statement.where(
            exists().where(
                InferenceJob.partition == partition,
                InferenceJob.study_instance_uid == Study.study_instance_uid,
                InferenceJob.state == JobState.DONE,
                InferenceJob.findings > 0,
                ~InferenceJob.model_name.startswith(COPY_JOB_PREFIX),
            )
        )
    elif rule.when == "reviewed":
        statement = statement.where(
            exists().where(
                FindingReview.partition == partition,
                FindingReview.study_instance_uid == Study.study_instance_uid,
            )
        )
    return statement


def queue_copies(
    archive: Archive,
    rules: list[ResearchCopy],
    *,
    now: datetime,
    stable_after_s: float,
    limit: int = 50,
) -> list[Job]:
    """Queue a copy job for each study a rule makes due (at most ``limit`` per rule); each in
    its own write transaction that checks again that the study is still due."""
    queued: list[Job] = []
    cutoff = now - timedelta(seconds=stable_after_s)
    for rule in rules:
        source = archive.scoped(rule.from_partition)
        with source.index.read() as session:
            due = session.execute(_due(source.partition, rule, cutoff).limit(limit)).all()
        for study_pk, study_uid, _ in due:
            with source.index.write() as session:
                still = session.execute(
                    _due(source.partition, rule, cutoff).where(Study.id == study_pk)
                ).one_or_none()
                if still is None:
                    continue
                row = enqueue(
                    session,
                    source.partition,
                    study_instance_uid=study_uid,
                    series_instance_uid=study_uid,  # one job per study
                    model_name=rule.job_name,
                    model_version="1",
                    priority=0,
                    input_received_at=still[2],
                    now=now,
                )
                queued.append(Job.from_row(row))
    for job in queued:
        log.info("study %s: research copy queued (%s)", job.study_instance_uid, job.model_name)
    return queued


@dataclass
class CopyOutcome:
    copied: int = 0
    held_back: list[tuple[str, str]] = field(default_factory=list)  # (SOP Instance UID, why)


def copy_study(
    source: Archive,
    target: Archive,
    deidentifier: Deidentifier,
    study_uid: str,
    *,
    tmp_dir: Path,
    origin: Origin,
) -> CopyOutcome:
    """Copy one study of ``source``'s partition, de-identified, into ``target``'s."""
    with target.index.read() as session:
        if session.get(Partition, target.partition) is None:
            raise NotFound(
                f"research copy: partition {target.partition!r} does not exist; create it first"
            )
    outcome = CopyOutcome()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    recorded = False
    for instance in list(locate_instances(source, entity_query(study_uid))):
        with tempfile.TemporaryDirectory(dir=tmp_dir) as folder:
            path = Path(folder) / "copy.dcm"
            try:
                done = write_deidentified(source, instance.blob_key, deidentifier, path)
            except HeldBack as why:
                outcome.held_back.append((instance.sop_instance_uid, str(why)))
                continue
            ingest_file(target, path, origin)
        outcome.copied += 1
        if not recorded:
            record_deidentified_study(source, deidentifier.project, done)
            recorded = True
    _copy_labels(source, target, deidentifier, study_uid)
    return outcome


def _copy_labels(
    source: Archive, target: Archive, deidentifier: Deidentifier, study_uid: str
) -> None:
    """The study's done model jobs, their findings and the review decisions, as rows of the
    target partition under the new UIDs, replacing what an earlier copy wrote."""
    uid = deidentifier.new_uid
    new_study = uid(study_uid)
    with source.index.read() as session:
        jobs = session.scalars(
            select(InferenceJob).where(
                InferenceJob.partition == source.partition,
                InferenceJob.study_instance_uid == study_uid,
                InferenceJob.state == JobState.DONE,
                ~InferenceJob.model_name.startswith(COPY_JOB_PREFIX),
            )
        ).all()
        findings = {
            job.id: session.scalars(select(AIFinding).where(AIFinding.job_id == job.id)).all()
            for job in jobs
        }
        reviews = session.scalars(
            select(FindingReview)
            .where(
                FindingReview.partition == source.partition,
                FindingReview.study_instance_uid == study_uid,
            )
            .order_by(FindingReview.id)
        ).all()
        session.expunge_all()
    with target.index.write() as session:
        old = select(InferenceJob.id).where(
            InferenceJob.partition == target.partition,
            InferenceJob.study_instance_uid == new_study,
        )
        session.execute(delete(AIFinding).where(AIFinding.job_id.in_(old)))
        session.execute(
            delete(InferenceJob).where(
                and_(
                    InferenceJob.partition == target.partition,
                    InferenceJob.study_instance_uid == new_study,
                )
            )
        )
        session.execute(
            delete(FindingReview).where(
                FindingReview.partition == target.partition,
                FindingReview.study_instance_uid == new_study,
            )
        )
        job_ids: dict[int, int] = {}
        for job in jobs:
            series = uid(job.series_instance_uid)
            row = InferenceJob(
                partition=target.partition,
                study_instance_uid=new_study,
                series_instance_uid=series,
                model_name=job.model_name,
                model_version=job.model_version,
                job_key=job_key(target.partition, new_study, series, job.model_name),
                generation=job.generation,
                state=JobState.DONE,
                priority=0,
                attempts=job.attempts,
                input_received_at=job.input_received_at,
                created_at=job.created_at,
                queued_at=job.queued_at,
                not_before=job.not_before,
                started_at=job.started_at,
                finished_at=job.finished_at,
                outputs=[uid(output) for output in job.outputs or []],
                findings=job.findings,
            )
            session.add(row)
            session.flush()
            job_ids[job.id] = row.id
            session.add_all(
                AIFinding(
                    partition=target.partition,
                    job_id=row.id,
                    study_instance_uid=new_study,
                    report_sop_instance_uid=uid(f.report_sop_instance_uid),
                    tracking_uid=uid(f.tracking_uid),
                    tracking_identifier=f.tracking_identifier,
                    finding=f.finding,
                    finding_code=f.finding_code,
                    site=f.site,
                    present=f.present,
                    size=f.size,
                    size_unit=f.size_unit,
                    segment_number=f.segment_number,
                    segmentation_sop_instance_uid=(
                        uid(f.segmentation_sop_instance_uid)
                        if f.segmentation_sop_instance_uid
                        else ""
                    ),
                )
                for f in findings[job.id]
            )
        session.add_all(
            FindingReview(
                partition=target.partition,
                study_instance_uid=new_study,
                job_id=job_ids.get(review.job_id) if review.job_id is not None else None,
                model_name=review.model_name,
                model_version=review.model_version,
                report_sop_instance_uid=uid(review.report_sop_instance_uid),
                tracking_uid=uid(review.tracking_uid),
                finding=review.finding,
                decision=review.decision,
                reviewer="",  # staff names and free-text comments stay in the clinical partition
                comment="",
                decided_at=review.decided_at,
                review_sop_instance_uid=uid(review.review_sop_instance_uid),
            )
            for review in reviews
        )
