"""The job queue: one row per (series, model) in the index database's ``inference_job`` table.

States: ``queued`` → ``running`` → ``done`` | ``failed``, and back to ``queued`` for a retry, a
re-run, or new instances in the series. A worker claims the queued job of highest priority
(oldest first), or a running one whose lease expired because its worker was killed or hung; it
renews the lease while it works (heartbeat). On PostgreSQL the claim is ``SELECT … FOR UPDATE SKIP
LOCKED``, so any number of workers claim different jobs without waiting for one another; on SQLite
the claim is one ``BEGIN IMMEDIATE`` write transaction (one writer at a time, one host).

Every re-queue on new input and every re-run bumps the job's ``generation``; a claim or a retry
does not. The UIDs of the job's SEG and SR derive from its key and generation
(:attr:`Job.output_key`), so a run that lost its job to a newer generation can never overwrite
the newer run's results, while a job claimed again after a killed worker stores the same UIDs
and replaces, never duplicates, what the killed run stored.

Times come from the clock of the process that writes them (UTC); hosts running workers must keep
their clocks synchronised (NTP) to well within ``lease_s``.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session

from config.settings import InferenceSettings
from storage.archive import Archive
from storage.delete import delete_instance
from storage.errors import Conflict, InvalidQuery, NotFound, StorageError
from storage.events import EventType, NewEvent, record_events
from storage.index.models import DEFAULT_PARTITION, AIFinding, InferenceJob, Study
from storage.query import entity_query, locate_instances

log = logging.getLogger(__name__)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    # SQLite keeps no time zone; every time Hilum writes is UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def job_key(partition: str, study_instance_uid: str, series_instance_uid: str, model: str) -> str:
    """A job's identity: the same for every attempt, re-run and re-queue of the job. The UIDs of
    its SEG and SR derive from it and the job's generation (:attr:`Job.output_key`)."""
    return "\\".join(("hilum-inference", partition, study_instance_uid, series_instance_uid, model))


@dataclass(frozen=True)
class Job:
    """A snapshot of one job row."""

    id: int
    study_instance_uid: str
    series_instance_uid: str
    model_name: str
    model_version: str
    job_key: str
    generation: int
    state: JobState
    priority: int
    attempts: int
    reason: str
    outputs: list[str]
    worker: str
    created_at: datetime
    queued_at: datetime
    not_before: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_expires_at: datetime | None
    # Findings the job's SR reports present; None until done (or done before migration 0004).
    findings: int | None = None
    # The partition of the job's study: where its inputs are read and its results stored.
    partition: str = DEFAULT_PARTITION

    @classmethod
    def from_row(cls, row: InferenceJob) -> Job:
        return cls(
            id=row.id,
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            model_name=row.model_name,
            model_version=row.model_version,
            job_key=row.job_key,
            generation=row.generation,
            state=JobState(row.state),
            priority=row.priority,
            attempts=row.attempts,
            reason=row.reason,
            outputs=list(row.outputs or []),
            worker=row.worker,
            created_at=as_utc(row.created_at),  # type: ignore[arg-type]
            queued_at=as_utc(row.queued_at),  # type: ignore[arg-type]
            not_before=as_utc(row.not_before),  # type: ignore[arg-type]
            started_at=as_utc(row.started_at),
            finished_at=as_utc(row.finished_at),
            lease_expires_at=as_utc(row.lease_expires_at),
            findings=row.findings,
            partition=row.partition,
        )

    @property
    def output_key(self) -> str:
        """What the UIDs of this generation's SEG and SR derive from: the same for every attempt
        of one generation, different for the next."""
        return f"{self.job_key}\\generation-{self.generation}"

    def as_json(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "id": self.id,
            "StudyInstanceUID": self.study_instance_uid,
            "SeriesInstanceUID": self.series_instance_uid,
            "model": {"name": self.model_name, "version": self.model_version},
            "state": str(self.state),
            "generation": self.generation,
            "priority": self.priority,
            "attempts": self.attempts,
            "reason": self.reason or None,
            "outputs": self.outputs,
            "findings": self.findings,
            "worker": self.worker or None,
            "created_at": iso(self.created_at),
            "queued_at": iso(self.queued_at),
            "not_before": iso(self.not_before),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "lease_expires_at": iso(self.lease_expires_at),
        }


@dataclass(frozen=True)
class JobFinding:
    """One finding of a job's TID 1500 SR, as the index keeps it (``ai_finding``)."""

    report_sop_instance_uid: str
    tracking_uid: str
    tracking_identifier: str
    finding: str  # code meaning
    finding_code: str  # "scheme:value"
    site: str
    present: bool
    size: float | None
    size_unit: str
    segment_number: int | None
    segmentation_sop_instance_uid: str

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def job_event(row: InferenceJob, event_type: EventType | None = None) -> NewEvent:
    """The change-feed event of the job's new state (``ai.queued``, ``ai.started``,
    ``ai.completed``, ``ai.failed``), written in the transaction that changes it."""
    if event_type is None:
        event_type = {
            JobState.QUEUED: EventType.AI_QUEUED,
            JobState.RUNNING: EventType.AI_STARTED,
            JobState.DONE: EventType.AI_COMPLETED,
            JobState.FAILED: EventType.AI_FAILED,
        }[JobState(row.state)]
    return NewEvent(
        event_type,
        row.study_instance_uid,
        {
            "job": row.id,
            "SeriesInstanceUID": row.series_instance_uid,
            "model": {"name": row.model_name, "version": row.model_version},
            "state": row.state,
            "generation": row.generation,
            "attempts": row.attempts,
            "priority": row.priority,
            "findings": row.findings,
            "outputs": list(row.outputs or []),
            "reason": row.reason or None,
        },
    )


def enqueue(
    session: Session,
    partition: str,
    *,
    study_instance_uid: str,
    series_instance_uid: str,
    model_name: str,
    model_version: str,
    priority: int,
    input_received_at: datetime,
    now: datetime,
) -> InferenceJob:
    """Queue a job in the caller's write transaction (the one that marks the study stable);
    the caller records its ``ai.queued`` event (:func:`job_event`) with the transaction's others.

    An existing job of the same series and model is reset to ``queued`` with the next
    generation, also while it runs: its worker then loses the job (at its next heartbeat, or at
    the latest when it checks before storing) and the job runs again on the new input, with new
    output UIDs.
    """
    row = session.scalars(
        select(InferenceJob)
        .where(
            InferenceJob.partition == partition,
            InferenceJob.series_instance_uid == series_instance_uid,
            InferenceJob.model_name == model_name,
        )
        .with_for_update()
    ).one_or_none()
    if row is None:
        row = InferenceJob(
            partition=partition,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            model_name=model_name,
            job_key=job_key(partition, study_instance_uid, series_instance_uid, model_name),
            created_at=now,
            generation=0,
        )
        session.add(row)
    _reset(row, now)
    row.model_version = model_version
    row.priority = priority
    row.input_received_at = input_received_at
    if priority > 0:
        # The worklist's STAT order reads the study's own column (migration 0004), so that its
        # first page is an index scan, not a sub-query per study.
        session.execute(
            update(Study)
            .where(
                Study.partition == partition,
                Study.study_instance_uid == study_instance_uid,
                Study.ai_priority < priority,
            )
            .values(ai_priority=priority)
        )
    session.flush()
    return row


def _reset(row: InferenceJob, now: datetime) -> None:
    """Queue the job anew, as its next generation."""
    row.generation += 1
    row.state = JobState.QUEUED
    row.attempts = 0
    row.reason = ""
    row.worker = ""
    row.queued_at = row.not_before = now
    row.started_at = row.finished_at = row.lease_expires_at = None
    row.findings = None


Clock = Callable[[], datetime]


class JobQueue:
    """Claims, heartbeats and finishes jobs of one partition.

    ``clock`` gives the time leases, backoffs and job times are computed from (UTC): the
    process's clock, or a test's, so that a lease expires or a backoff passes without waiting.
    """

    def __init__(
        self, archive: Archive, settings: InferenceSettings, *, clock: Clock = utc_now
    ) -> None:
        self.archive = archive
        self.settings = settings
        self.clock = clock

    def in_partition(self, partition: str) -> JobQueue:
        """The same queue, for the jobs of ``partition``."""
        return JobQueue(self.archive.scoped(partition), self.settings, clock=self.clock)

    def _owned(self, session: Session, job: Job, worker: str) -> InferenceJob | None:
        """The job row, locked, if ``worker`` still holds this generation of it."""
        return session.scalars(
            select(InferenceJob)
            .where(
                InferenceJob.id == job.id,
                InferenceJob.state == JobState.RUNNING,
                InferenceJob.worker == worker,
                InferenceJob.generation == job.generation,
            )
            .with_for_update()
        ).one_or_none()

    def claim(
        self, worker: str, models: Collection[str] | None = None, *, any_partition: bool = False
    ) -> Job | None:
        """The next job for ``worker``, now running under a lease; None when there is none.
        ``models``: the names of the models the worker has (None: any), so that a worker never
        claims a job it cannot run. ``any_partition``: the next job of every partition (the AI
        worker serves them all; it goes on with :meth:`in_partition` of ``Job.partition``)."""
        with self.archive.index.write() as session:
            while True:
                now = self.clock()
                statement = select(InferenceJob).where(
                    or_(
                        and_(
                            InferenceJob.state == JobState.QUEUED,
                            InferenceJob.not_before <= now,
                        ),
                        and_(
                            InferenceJob.state == JobState.RUNNING,
                            InferenceJob.lease_expires_at < now,
                        ),
                    ),
                )
                if not any_partition:
                    statement = statement.where(InferenceJob.partition == self.archive.partition)
                if models is not None:
                    statement = statement.where(InferenceJob.model_name.in_(list(models)))
                row = session.scalars(
                    statement.order_by(InferenceJob.priority.desc(), InferenceJob.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).first()
                if row is None:
                    return None
                if row.state == JobState.RUNNING and row.attempts >= self.settings.max_attempts:
                    # Its worker died (or hung) on every attempt: a job that kills workers.
                    row.state = JobState.FAILED
                    row.finished_at = now
                    row.lease_expires_at = None
                    row.reason = (
                        f"worker {row.worker} stopped renewing its lease (killed or hung) on "
                        f"attempt {row.attempts} of {self.settings.max_attempts}; giving up"
                    )
                    session.flush()
                    record_events(session, row.partition, [job_event(row)], now)
                    continue
                row.state = JobState.RUNNING
                row.attempts += 1
                row.worker = worker
                row.started_at = now
                row.finished_at = None
                row.lease_expires_at = now + timedelta(seconds=self.settings.lease_s)
                session.flush()
                claimed = Job.from_row(row)
                record_events(session, row.partition, [job_event(row)], now)
                return claimed

    def heartbeat(self, job: Job, worker: str) -> bool:
        """Renew the lease; False when this generation of the job is no longer ``worker``'s
        (re-queued, or claimed by another worker after the lease expired). The worker calls it
        also right before storing each output, so a run that lost its job stores nothing."""
        with self.archive.index.write() as session:
            row = self._owned(session, job, worker)
            if row is None:
                return False
            row.lease_expires_at = self.clock() + timedelta(seconds=self.settings.lease_s)
            return True

    def complete(
        self,
        job: Job,
        worker: str,
        *,
        model_version: str,
        outputs: list[str],
        findings: Sequence[JobFinding] | None = None,
    ) -> bool:
        """Mark the job done with the SOP Instance UIDs of its ``outputs`` and the ``findings``
        its SR reports (rows of ``ai_finding``, replacing the earlier ones), then delete the
        outputs of its earlier generations that the new ones do not replace (e.g. a SEG when
        nothing was found this time). False when ``worker`` had lost the job: see
        :meth:`discard_stale_outputs`."""
        with self.archive.index.write() as session:
            row = self._owned(session, job, worker)
            if row is None:
                return False
            superseded = [uid for uid in row.outputs or [] if uid not in outputs]
            row.state = JobState.DONE
            row.model_version = model_version
            row.outputs = outputs
            row.findings = None if findings is None else sum(f.present for f in findings)
            row.reason = ""
            session.execute(delete(AIFinding).where(AIFinding.job_id == row.id))
            session.add_all(
                AIFinding(
                    partition=self.archive.partition,
                    job_id=row.id,
                    study_instance_uid=row.study_instance_uid,
                    **dataclasses.asdict(finding),
                )
                for finding in findings or []
            )
            row.finished_at = self.clock()
            row.lease_expires_at = None
            session.flush()
            record_events(session, row.partition, [job_event(row)], row.finished_at)
        # After the commit: from now on nothing refers to the superseded outputs.
        self.delete_outputs(job.study_instance_uid, superseded)
        return True

    def discard_stale_outputs(self, job: Job, stored: list[str]) -> list[str]:
        """Delete what a run that lost its job had stored, unless the job still refers to it
        (its current outputs) or will store it again (the same generation is queued or runs
        elsewhere, with the same UIDs); the SOP Instance UIDs deleted."""
        with self.archive.index.read() as session:
            row = self._row(session, job.id)
            if row.generation == job.generation and row.state in (
                JobState.QUEUED,
                JobState.RUNNING,
            ):
                return []
            current = set(row.outputs or [])
        stale = [uid for uid in stored if uid not in current]
        self.delete_outputs(job.study_instance_uid, stale)
        return stale

    def delete_outputs(self, study_instance_uid: str, sop_instance_uids: list[str]) -> None:
        """Delete results through ``storage.delete`` (the one delete path); one that cannot be
        deleted is logged, as the job's state is already recorded."""
        if not sop_instance_uids:
            return
        query = entity_query(study_instance_uid, instances=sop_instance_uids)
        try:
            for stored in list(locate_instances(self.archive, query)):
                try:
                    delete_instance(
                        self.archive,
                        stored.study_instance_uid,
                        stored.series_instance_uid,
                        stored.sop_instance_uid,
                    )
                except NotFound:
                    continue  # deleted meanwhile
                log.info("deleted result %s of an earlier run", stored.sop_instance_uid)
        except StorageError as error:
            log.warning(
                "results %s not deleted (delete them by hand): %s",
                ", ".join(sop_instance_uids),
                error,
            )

    def fail(self, job: Job, worker: str, reason: str, *, retry: bool) -> Job | None:
        """Record a failed attempt: queued again after a backoff (doubling with each attempt)
        while attempts remain and ``retry`` is true, else ``failed`` with the reason. None when
        ``worker`` had lost the job."""
        with self.archive.index.write() as session:
            row = self._owned(session, job, worker)
            if row is None:
                return None
            now = self.clock()
            row.lease_expires_at = None
            row.reason = reason
            if retry and row.attempts < self.settings.max_attempts:
                backoff = self.settings.retry_backoff_s * 2 ** (row.attempts - 1)
                row.state = JobState.QUEUED
                row.not_before = now + timedelta(seconds=backoff)
            else:
                row.state = JobState.FAILED
                row.finished_at = now
            session.flush()
            ended = Job.from_row(row)
            if row.state == JobState.FAILED:  # a retried attempt is no news to subscribers
                record_events(session, row.partition, [job_event(row)], now)
            return ended

    def rerun(self, job_id: int) -> Job:
        """Queue a done or failed job again, as its next generation, with fresh attempts. A
        queued job stays as it is; a running one is a :class:`Conflict`."""
        with self.archive.index.write() as session:
            row = self._row(session, job_id, lock=True)
            if row.state == JobState.RUNNING:
                raise Conflict(f"job {job_id} is running; re-run it when it has finished")
            if row.state != JobState.QUEUED:
                _reset(row, self.clock())
                session.flush()
                rerun = Job.from_row(row)
                record_events(session, row.partition, [job_event(row)])
                return rerun
            return Job.from_row(row)

    def get(self, job_id: int) -> Job:
        with self.archive.index.read() as session:
            return Job.from_row(self._row(session, job_id))

    def for_study(self, study_instance_uid: str) -> list[Job]:
        with self.archive.index.read() as session:
            rows = session.scalars(
                select(InferenceJob)
                .where(
                    InferenceJob.partition == self.archive.partition,
                    InferenceJob.study_instance_uid == study_instance_uid,
                )
                .order_by(InferenceJob.id)
            ).all()
            return [Job.from_row(row) for row in rows]

    def search(
        self,
        *,
        state: str | None = None,
        model: str | None = None,
        study_instance_uid: str | None = None,
        before_id: int | None = None,
        limit: int = 100,
        queue_order: bool = False,
    ) -> list[Job]:
        """Jobs newest first (highest id), filtered by state, model name and study; keyset
        paging: ``before_id`` is the id of the last job of the previous page. ``queue_order``:
        the order workers claim queued jobs in instead (STAT first, then oldest first; one
        page, no paging)."""
        if state is not None and state not in set(JobState):
            raise InvalidQuery(f"state must be one of {', '.join(JobState)}, not {state!r}")
        statement = select(InferenceJob).where(InferenceJob.partition == self.archive.partition)
        if state:
            statement = statement.where(InferenceJob.state == state)
        if model:
            statement = statement.where(InferenceJob.model_name == model)
        if study_instance_uid:
            statement = statement.where(InferenceJob.study_instance_uid == study_instance_uid)
        if queue_order:
            statement = statement.order_by(InferenceJob.priority.desc(), InferenceJob.id)
        else:
            if before_id is not None:
                statement = statement.where(InferenceJob.id < before_id)
            statement = statement.order_by(InferenceJob.id.desc())
        statement = statement.limit(max(1, min(limit, 1000)))
        with self.archive.index.read() as session:
            return [Job.from_row(row) for row in session.scalars(statement)]

    def findings_of_study(self, study_instance_uid: str) -> list[tuple[Job, JobFinding]]:
        """The findings of the study's done jobs, with their job, in job and report order."""
        with self.archive.index.read() as session:
            rows = session.execute(
                select(InferenceJob, AIFinding)
                .join(AIFinding, AIFinding.job_id == InferenceJob.id)
                .where(
                    InferenceJob.partition == self.archive.partition,
                    InferenceJob.study_instance_uid == study_instance_uid,
                )
                .order_by(InferenceJob.id, AIFinding.id)
            ).all()
            return [
                (
                    Job.from_row(job),
                    JobFinding(
                        **{
                            field.name: getattr(finding, field.name)
                            for field in dataclasses.fields(JobFinding)
                        }
                    ),
                )
                for job, finding in rows
            ]

    def _row(self, session: Session, job_id: int, *, lock: bool = False) -> InferenceJob:
        if not 0 < job_id < 2**63:  # no such id in a BIGINT column; SQL could not compare it
            raise NotFound(f"no inference job {job_id}")
        statement = select(InferenceJob).where(
            InferenceJob.partition == self.archive.partition, InferenceJob.id == job_id
        )
        row = session.scalars(statement.with_for_update() if lock else statement).one_or_none()
        if row is None:
            raise NotFound(f"no inference job {job_id}")
        return row
