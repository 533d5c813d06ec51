"""What the FHIR side (``server/fhir/``) reads from the index: studies with their patient,
series and instances; done AI jobs with their findings and the reviewers' current decisions.
Plain records; the resources are built in ``server/fhir/resources.py``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select

from storage.events import as_utc
from storage.index.models import (
    AIFinding,
    FindingReview,
    InferenceJob,
    Instance,
    Patient,
    Series,
    Study,
)
from storage.jobs import JobState

if TYPE_CHECKING:
    from storage.archive import Archive

MAX_RESULTS = 500


@dataclass(frozen=True)
class PatientRecord:
    pk: int
    patient_id: str
    issuer: str
    name: str  # DICOM PN: family^given^middle^prefix^suffix
    birth_date: str  # YYYYMMDD or ""
    sex: str  # M, F, O or ""


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    number: int | None


@dataclass(frozen=True)
class SeriesRecord:
    series_instance_uid: str
    number: int | None
    modality: str
    description: str
    body_part: str
    instances: list[InstanceRecord]


@dataclass(frozen=True)
class StudyRecord:
    study_instance_uid: str
    patient: PatientRecord
    study_date: str
    study_time: str
    accession_number: str
    description: str
    last_updated: datetime
    series: list[SeriesRecord]


@dataclass(frozen=True)
class FindingRecord:
    tracking_uid: str
    finding: str
    finding_code: str  # "scheme:value", e.g. "SCT:52988006"
    site: str
    present: bool
    size: float | None
    size_unit: str  # UCUM
    decision: str | None  # the latest review: accepted | rejected; None: not reviewed
    decided_at: datetime | None


@dataclass(frozen=True)
class ReportRecord:
    job_id: int
    study_instance_uid: str
    series_instance_uid: str
    patient: PatientRecord
    model_name: str
    model_version: str
    report_sop_instance_uid: str  # the job's TID 1500 SR ("" when none)
    finished_at: datetime
    findings: list[FindingRecord]

    @property
    def last_updated(self) -> datetime:
        return max([self.finished_at, *(f.decided_at for f in self.findings if f.decided_at)])


def _patient(row: Patient) -> PatientRecord:
    return PatientRecord(
        row.id,
        row.patient_id,
        row.issuer_of_patient_id,
        row.patient_name,
        row.patient_birth_date,
        row.patient_sex,
    )


def get_patient(archive: Archive, pk: int) -> PatientRecord | None:
    with archive.index.read() as session:
        row = session.scalars(
            select(Patient).where(Patient.partition == archive.partition, Patient.id == pk)
        ).one_or_none()
        return None if row is None else _patient(row)


def find_patients(archive: Archive, *, identifier: str | None = None) -> list[PatientRecord]:
    statement = select(Patient).where(Patient.partition == archive.partition)
    if identifier is not None:
        statement = statement.where(Patient.patient_id == identifier)
    with archive.index.read() as session:
        return [
            _patient(row)
            for row in session.scalars(statement.order_by(Patient.id).limit(MAX_RESULTS))
        ]


def job_ids_of(
    archive: Archive,
    *,
    tracking_uids: Sequence[str] | None = None,
    report_uids: Sequence[str] | None = None,
) -> list[int]:
    """The jobs whose findings have these Tracking UIDs, or whose SR is one of these."""
    statement = select(AIFinding.job_id).where(AIFinding.partition == archive.partition)
    if tracking_uids is not None:
        statement = statement.where(AIFinding.tracking_uid.in_(list(tracking_uids)))
    if report_uids is not None:
        statement = statement.where(AIFinding.report_sop_instance_uid.in_(list(report_uids)))
    with archive.index.read() as session:
        return sorted(set(session.scalars(statement.limit(MAX_RESULTS))))


def find_studies(
    archive: Archive,
    *,
    study_instance_uids: Sequence[str] | None = None,
    patient_pk: int | None = None,
    updated_after: datetime | None = None,
    limit: int = MAX_RESULTS,
) -> list[StudyRecord]:
    """Studies (newest activity first) with their series and instances, at most ``limit``
    (at most 500): each holds every instance row of the study, so pages stay small."""
    statement = (
        select(Study, Patient)
        .join(Patient, Study.patient_pk == Patient.id)
        .where(Study.partition == archive.partition)
    )
    if study_instance_uids is not None:
        statement = statement.where(Study.study_instance_uid.in_(list(study_instance_uids)))
    if patient_pk is not None:
        statement = statement.where(Study.patient_pk == patient_pk)
    if updated_after is not None:
        statement = statement.where(Study.last_instance_at >= updated_after)
    statement = statement.order_by(Study.last_instance_at.desc(), Study.id).limit(
        max(1, min(limit, MAX_RESULTS))
    )
    with archive.index.read() as session:
        found = session.execute(statement).all()
        if not found:
            return []
        series_rows = session.execute(
            select(Series, Instance)
            .join(Instance, Instance.series_pk == Series.id)
            .where(Series.study_pk.in_([study.id for study, _ in found]))
            .order_by(
                Series.study_pk,
                Series.series_number,
                Series.id,
                Instance.instance_number,
                Instance.id,
            )
        ).all()
        by_study: dict[int, dict[int, SeriesRecord]] = {}
        for series, instance in series_rows:
            record = by_study.setdefault(series.study_pk, {}).get(series.id)
            if record is None:
                record = SeriesRecord(
                    series.series_instance_uid,
                    series.series_number,
                    series.modality,
                    series.series_description,
                    series.body_part_examined,
                    [],
                )
                by_study[series.study_pk][series.id] = record
            record.instances.append(
                InstanceRecord(
                    instance.sop_instance_uid, instance.sop_class_uid, instance.instance_number
                )
            )
        return [
            StudyRecord(
                study.study_instance_uid,
                _patient(patient),
                study.study_date,
                study.study_time,
                study.accession_number,
                study.study_description,
                as_utc(study.last_instance_at),
                list(by_study.get(study.id, {}).values()),
            )
            for study, patient in found
        ]


def find_reports(
    archive: Archive,
    *,
    job_ids: Sequence[int] | None = None,
    study_instance_uids: Sequence[str] | None = None,
    patient_pk: int | None = None,
) -> list[ReportRecord]:
    """Done AI jobs with their findings and each finding's current decision, newest first."""
    statement = (
        select(InferenceJob, Patient)
        .join(
            Study,
            (Study.partition == InferenceJob.partition)
            & (Study.study_instance_uid == InferenceJob.study_instance_uid),
        )
        .join(Patient, Study.patient_pk == Patient.id)
        .where(InferenceJob.partition == archive.partition, InferenceJob.state == JobState.DONE)
    )
    if job_ids is not None:
        statement = statement.where(InferenceJob.id.in_(list(job_ids)))
    if study_instance_uids is not None:
        statement = statement.where(InferenceJob.study_instance_uid.in_(list(study_instance_uids)))
    if patient_pk is not None:
        statement = statement.where(Study.patient_pk == patient_pk)
    statement = statement.order_by(InferenceJob.id.desc()).limit(MAX_RESULTS)
    with archive.index.read() as session:
        jobs = session.execute(statement).all()
        ids = [job.id for job, _ in jobs]
        findings: dict[int, list[AIFinding]] = {}
        for row in session.scalars(
            select(AIFinding).where(AIFinding.job_id.in_(ids)).order_by(AIFinding.id)
        ):
            findings.setdefault(row.job_id, []).append(row)
        decisions: dict[tuple[str, str], FindingReview] = {}
        for review in session.scalars(
            select(FindingReview)
            .where(
                FindingReview.partition == archive.partition,
                FindingReview.study_instance_uid.in_({job.study_instance_uid for job, _ in jobs}),
            )
            .order_by(FindingReview.decided_at, FindingReview.id)
        ):
            # The latest decision on a finding of that report is its current one.
            decisions[(review.report_sop_instance_uid, review.tracking_uid)] = review
        reports = []
        for job, patient in jobs:
            rows = findings.get(job.id, [])
            report_uid = rows[0].report_sop_instance_uid if rows else ""
            records = []
            for row in rows:
                decided = decisions.get((row.report_sop_instance_uid, row.tracking_uid))
                records.append(
                    FindingRecord(
                        row.tracking_uid,
                        row.finding,
                        row.finding_code,
                        row.site,
                        row.present,
                        row.size,
                        row.size_unit,
                        decided.decision if decided else None,
                        as_utc(decided.decided_at) if decided else None,
                    )
                )
            reports.append(
                ReportRecord(
                    job.id,
                    job.study_instance_uid,
                    job.series_instance_uid,
                    _patient(patient),
                    job.model_name,
                    job.model_version,
                    report_uid,
                    as_utc(job.finished_at or job.queued_at),
                    records,
                )
            )
        return reports
