"""Research copies (``[[research.copies]]``): which studies of a partition to copy, and the copy.

A rule's studies are queued as jobs of the AI worker's queue (``storage.jobs``), one per study,
named after the rule (``research-copy:<project>:<to>``) in place of a model, in the ``from``
partition: claimed, leased and retried like a model's job. They are queued in the transaction
that marks the study stable (``inference.stability``, as the model jobs are), when the study
matches the rule's ``when`` (``ai-positive``: a done model job counted a finding; ``reviewed``:
a reviewer's decision exists) and no copy job was queued at its current ``last_instance_at``.
What makes a study match later (the AI's SEG and SR, a review SR) is stored into it and so makes
it stable once more: it is copied (again) then, under the same new UIDs (a copy replaces, never
duplicates).

The copy reads each instance from the blob store, de-identifies it (``storage.deidentify``;
held-back instances stay behind), stores it into the ``to`` partition through ``storage.ingest``,
and carries the study's AI job results, findings and review decisions over as index rows under
the new UIDs (reviewer names and comments stay behind). The way back is recorded in the
``from`` partition only (``storage.pseudonyms``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import and_, delete, select
from sqlalchemy.orm import Session

from storage.deidentify import Deidentifier, HeldBack
from storage.errors import NotFound
from storage.export import write_deidentified
from storage.index.models import (
    AIFinding,
    FindingReview,
    InferenceJob,
    Partition,
)
from storage.ingest import Origin, ingest_file
from storage.jobs import JobState, as_utc, enqueue, job_key
from storage.pseudonyms import record_deidentified_study
from storage.query import entity_query, locate_instances

if TYPE_CHECKING:
    from config.settings import ResearchCopy
    from storage.archive import Archive

log = logging.getLogger(__name__)
COPY_JOB_PREFIX = "research-copy:"


def is_copy_job(model_name: str) -> bool:
    return model_name.startswith(COPY_JOB_PREFIX)


def queue_copy_jobs(
    session: Session,
    partition: str,
    rules: Sequence[ResearchCopy],
    study_uid: str,
    last_instance_at: datetime,
    now: datetime,
) -> list[InferenceJob]:
    """In the transaction that marks the study stable (``inference.stability``): a copy job for
    each rule of ``partition`` whose ``when`` the study meets, unless one was queued at this
    ``last_instance_at`` already."""
    rows = []
    for rule in rules:
        if rule.from_partition != partition or not _meets(session, partition, rule, study_uid):
            continue
        done = session.scalar(
            select(InferenceJob.input_received_at).where(
                InferenceJob.partition == partition,
                InferenceJob.series_instance_uid == study_uid,
                InferenceJob.model_name == rule.job_name,
            )
        )
        if done is not None and as_utc(done) >= as_utc(last_instance_at):  # type: ignore[operator]
            continue
        rows.append(
            enqueue(
                session,
                partition,
                study_instance_uid=study_uid,
                series_instance_uid=study_uid,  # one job per study
                model_name=rule.job_name,
                model_version="1",
                priority=0,
                input_received_at=last_instance_at,
                now=now,
            )
        )
    return rows


def _meets(session: Session, partition: str, rule: ResearchCopy, study_uid: str) -> bool:
    if rule.when == "ai-positive":
        return (
            session.scalar(
                select(InferenceJob.id)
                .where(
                    InferenceJob.partition == partition,
                    InferenceJob.study_instance_uid == study_uid,
                    InferenceJob.state == JobState.DONE,
                    InferenceJob.findings > 0,
                    ~InferenceJob.model_name.startswith(COPY_JOB_PREFIX),
                )
                .limit(1)
            )
            is not None
        )
    if rule.when == "reviewed":
        return (
            session.scalar(
                select(FindingReview.id)
                .where(
                    FindingReview.partition == partition,
                    FindingReview.study_instance_uid == study_uid,
                )
                .limit(1)
            )
            is not None
        )
    return True


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
                done = write_deidentified(
                    source, instance.blob_key, deidentifier, path, instance.tier
                )
            except HeldBack as why:
                outcome.held_back.append((instance.sop_instance_uid, str(why)))
                continue
            ingest_file(target, path, origin)
        outcome.copied += 1
        if not recorded:
            record_deidentified_study(source, deidentifier.project, done)
            recorded = True
    if outcome.copied:
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
