"""The study page (``/studies/{StudyInstanceUID}``): patient and study, series with thumbnails,
the AI jobs and the findings read from each job's stored TID 1500 SR, and the reviewer's
Accept / Reject of each finding (``POST /studies/{uid}/reviews``), stored as a verified SR in the
study (:mod:`web.review_report`) and indexed (:mod:`storage.reviews`)."""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from flask import Blueprint, redirect, render_template, request
from pydicom.dataset import Dataset

from config import Settings
from inference.catalog import REFERENCE_MODELS_DIR, ModelCatalog, manifest_names
from inference.errors import ModelError
from inference.measurement_report import ReportedFinding, read_findings, with_outlines
from inference.stability import queue_model_by_hand
from server.access import Action, requires
from server.context import http_context
from server.partitions import request_archive, request_root
from storage.archive import Archive
from storage.audit import AuditEntry, AuditEvent, refusal_entry
from storage.errors import InvalidQuery, NotFound, StorageError
from storage.ingest import Origin, ingest_file
from storage.jobs import Job, JobQueue, JobState
from storage.query import Query, QueryLevel, entity_query, locate_instances, search
from storage.reviews import Decision, ReviewDecision, record_review, reviews_for_study
from storage.worklist import AI_STATE_LABELS, WorklistRequest, search_worklist
from web.ohif import viewer_url
from web.review_report import review_report

log = logging.getLogger(__name__)

# PS3.4 B.5: the SR Storage SOP Classes share this root.
SR_SOP_CLASS_ROOT = "1.2.840.10008.5.1.4.1.1.88."
STUDY_KEYS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
)  # fmt: skip
SERIES_KEYS = (
    "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)  # fmt: skip
# Modalities whose series have no pixel data to draw a thumbnail of.
NO_THUMBNAIL = {"SR", "KO", "PR", "DOC"}
MAX_REVIEWER, MAX_COMMENT = 64, 1024


def reference_model_names() -> frozenset[str]:
    """The names of the reference models shipped with Hilum (trained on synthetic data, not
    for clinical use), read from their manifests without loading a model."""
    return frozenset(manifest_names([REFERENCE_MODELS_DIR]))


@dataclass
class ReviewedFinding:
    finding: ReportedFinding
    decision: ReviewDecision | None  # the latest one
    history: list[ReviewDecision] = field(default_factory=list)


@dataclass
class JobResult:
    job: Job
    report_sop_instance_uid: str | None
    findings: list[ReviewedFinding]
    reference_model: bool


def _read(archive: Archive, study_uid: str, sop_instance_uids: list[str]) -> list[Dataset]:
    """The stored instances among ``sop_instance_uids`` that are SR documents, parsed."""
    if not sop_instance_uids:
        return []
    reports = []
    for stored in locate_instances(archive, entity_query(study_uid, instances=sop_instance_uids)):
        if stored.sop_class_uid.startswith(SR_SOP_CLASS_ROOT):
            with archive.blobs.open(stored.blob_key, tier=stored.tier) as f:
                reports.append(pydicom.dcmread(io.BytesIO(f.read())))
    # In the order the worker stored them: the measurement report first (inference.analysis).
    return sorted(reports, key=lambda r: sop_instance_uids.index(str(r.SOPInstanceUID)))


def _model_report(archive: Archive, job: Job) -> Dataset | None:
    reports = _read(archive, job.study_instance_uid, job.outputs)
    return reports[0] if reports else None


def _reported_findings(archive: Archive, job: Job) -> tuple[Dataset | None, list[ReportedFinding]]:
    """The job's measurement report and its findings, with their lesions' outlines from the
    job's other report (a slice model's, when it found something)."""
    reports = _read(archive, job.study_instance_uid, job.outputs)
    if not reports:
        return None, []
    outlines = [finding for other in reports[1:] for finding in read_findings(other)]
    return reports[0], with_outlines(read_findings(reports[0]), outlines)


def _job_results(
    archive: Archive, jobs: list[Job], reviews: list[ReviewDecision], reference: frozenset[str]
) -> list[JobResult]:
    results = []
    for job in jobs:
        report, reported = (
            _reported_findings(archive, job) if job.state == JobState.DONE else (None, [])
        )
        findings = []
        for finding in reported:
            history = [
                r
                for r in reviews
                if r.tracking_uid == finding.tracking_uid
                and r.report_sop_instance_uid == report.SOPInstanceUID  # type: ignore[union-attr]
            ]
            findings.append(ReviewedFinding(finding, history[-1] if history else None, history))
        results.append(
            JobResult(
                job,
                str(report.SOPInstanceUID) if report is not None else None,
                findings,
                job.model_name in reference,
            )
        )
    return results


def _study(archive: Archive, study_uid: str) -> dict[str, Any]:
    query = Query(QueryLevel.STUDY, {"StudyInstanceUID": study_uid}, return_keys=STUDY_KEYS)
    rows = list(search(archive, query))
    if not rows:
        raise NotFound(f"no study {study_uid} in this archive")
    return rows[0]


def _series(archive: Archive, study_uid: str) -> list[dict[str, Any]]:
    query = Query(QueryLevel.SERIES, {"StudyInstanceUID": study_uid}, return_keys=SERIES_KEYS)
    rows = list(search(archive, query))
    return sorted(rows, key=lambda s: (s.get("SeriesNumber") is None, s.get("SeriesNumber") or 0))


def register(blueprint: Blueprint, settings: Settings) -> None:
    reference = reference_model_names()
    catalog = ModelCatalog(settings.inference.models_dirs)

    @blueprint.get("/studies/<study_uid>")
    @requires(Action.QUERY)
    def study_page(study_uid: str) -> Any:
        archive = request_archive()
        queue = JobQueue(archive, settings.inference)
        try:
            study = _study(archive, study_uid)
        except StorageError as error:
            entry = refusal_entry(
                AuditEvent.VIEW, error, service="study page", study_uids=[study_uid]
            )
            archive.record_refusal(http_context(), entry)
            raise
        # PS3.15 A.5.3.6 DICOM Instances Accessed (R): the page shows the patient and study.
        archive.record(
            http_context(),
            AuditEntry(
                AuditEvent.VIEW,
                patient_id=str(study.get("PatientID") or "")[:64],
                study_uids=(study_uid,),
                detail={"service": "study page"},
            ),
        )
        (listed,) = search_worklist(
            archive, WorklistRequest(matching={"StudyInstanceUID": study_uid}, limit=1)
        ).studies
        reviews = reviews_for_study(archive, study_uid)
        return render_template(
            "study.html",
            study=study,
            listed=listed,
            ai_state_label=AI_STATE_LABELS[listed.ai_state],
            series=_series(archive, study_uid),
            no_thumbnail=NO_THUMBNAIL,
            results=_job_results(archive, queue.for_study(study_uid), reviews, reference),
            reviews=reviews,
            saved=request.args.get("saved"),
            queued=request.args.get("queued"),
            models=manifest_names(settings.inference.models_dirs),
            viewer_url=viewer_url(archive.partition, study_uid),
        )

    @blueprint.post("/studies/<study_uid>/jobs")
    @requires(Action.JOBS)
    def run_model(study_uid: str) -> Any:
        """Someone allowed to run jobs runs a model on the study by hand."""
        try:
            model = catalog.get(request.form.get("model", ""))
        except ModelError as error:
            raise InvalidQuery(str(error)) from None
        jobs = queue_model_by_hand(request_archive(), settings, model, study_uid)
        return redirect(
            f"{request_root()}/studies/{study_uid}?queued={model.name}+on+{len(jobs)}+series", 303
        )

    @blueprint.post("/studies/<study_uid>/reviews")
    @requires(Action.REVIEW)
    def review_finding(study_uid: str) -> Any:
        archive = request_archive()
        queue = JobQueue(archive, settings.inference)
        form = request.form
        try:
            decision = Decision(form.get("decision", ""))
        except ValueError:
            raise InvalidQuery("decision must be 'accepted' or 'rejected'") from None
        reviewer = " ".join(form.get("reviewer", "").split())
        principal = http_context().principal
        if principal.kind != "anonymous":
            reviewer = principal.name  # logged in: the reviewer is who is logged in
        comment = form.get("comment", "").strip()
        if not reviewer:
            raise InvalidQuery("enter your name as the reviewer before accepting or rejecting")
        if len(reviewer) > MAX_REVIEWER or "\\" in reviewer or len(comment) > MAX_COMMENT:
            raise InvalidQuery(
                f"the reviewer's name (at most {MAX_REVIEWER} characters, no backslash) or the "
                f"comment (at most {MAX_COMMENT} characters) is too long"
            )
        try:
            job = queue.get(int(form.get("job", "")))
        except ValueError:
            raise InvalidQuery("no job named") from None
        if job.study_instance_uid != study_uid:
            raise NotFound(f"job {job.id} is not a job of study {study_uid}")
        report = _model_report(archive, job)
        tracking_uid = form.get("tracking_uid", "")
        finding = next(
            (f for f in read_findings(report) if f.tracking_uid == tracking_uid)
            if report is not None
            else iter(()),
            None,
        )
        if report is None or finding is None:
            raise NotFound(f"job {job.id} has no finding {tracking_uid!r} (re-run meanwhile?)")
        decided_at = datetime.now(UTC)
        earlier = reviews_for_study(archive, study_uid)
        sr = review_report(
            report,
            finding,
            decision,
            reviewer=reviewer,
            comment=comment,
            organization=settings.web.verifying_organization,
            decided_at=decided_at,
            instance_number=len(earlier) + 1,
        )
        stored = _store(archive, settings, sr)
        record_review(
            archive,
            ReviewDecision(
                study_instance_uid=study_uid,
                job_id=job.id,
                model_name=job.model_name,
                model_version=job.model_version,
                report_sop_instance_uid=str(report.SOPInstanceUID),
                tracking_uid=finding.tracking_uid,
                finding=finding.title,
                decision=decision,
                reviewer=reviewer,
                comment=comment,
                decided_at=decided_at,
                review_sop_instance_uid=stored,
            ),
        )
        log.info("study %s: finding %s %s (SR %s)", study_uid, tracking_uid, decision, stored)
        anchor = f"finding-{finding.tracking_uid}"
        return redirect(
            f"{request_root()}/studies/{study_uid}?saved={decision.value}#{anchor}", code=303
        )


def _store(archive: Archive, settings: Settings, dataset: Dataset) -> str:
    """Store through the one ingest path, with Hilum's AE title as the origin: like the
    worker's results, a review is never an input to a model (inference/stability.py)."""
    tmp_dir = settings.server.data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(suffix=".dcm", dir=tmp_dir)
    os.close(handle)
    path = Path(name)
    try:
        dataset.save_as(path, enforce_file_format=True)
        origin = Origin(calling_ae_title=settings.dimse.ae_title)
        return ingest_file(archive, path, origin, requestor=http_context()).sop_instance_uid
    finally:
        path.unlink(missing_ok=True)


__all__ = ["register", "reference_model_names"]
