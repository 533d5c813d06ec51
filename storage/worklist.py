"""The worklist: studies with their AI state, STAT first, filtered and sorted, one page at a time.

The DICOM matching (patient name, ID, accession, date range, modality) is ``storage.query``'s
own translation (:func:`storage.query.where_studies_match`); this module adds what DICOM has no
key for: the AI state of a study and whether it is STAT, both derived from its jobs.

Paging is by keyset, never by OFFSET: a page ends with a cursor holding the sort values of its
last row, and the next page starts after them, so page 500 costs what page 1 costs and a study
arriving meanwhile shifts nothing.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, exists, func, literal, or_, select, tuple_
from sqlalchemy.orm import aliased

from storage.errors import InvalidQuery
from storage.index.models import AIFinding, FindingReview, InferenceJob, Patient, Study
from storage.jobs import JobState, as_utc
from storage.query import Query, QueryLevel, where_studies_match

if TYPE_CHECKING:
    from storage.archive import Archive


class AIState(StrEnum):
    """What the AI side has done with a study, as the worklist shows it."""

    WAITING = "waiting"  # instances still arriving: not stable yet, nothing queued
    QUEUED = "queued"
    RUNNING = "running"
    FINDINGS = "findings"  # done, and at least one model found something
    NO_FINDINGS = "no_findings"  # done, nothing found
    FAILED = "failed"
    NO_MODEL = "no_model"  # stable, and no model applies to any of its series


AI_STATE_LABELS = {
    AIState.WAITING: "Waiting for the study to settle",
    AIState.QUEUED: "Queued",
    AIState.RUNNING: "Running",
    AIState.FINDINGS: "Findings",
    AIState.NO_FINDINGS: "No findings",
    AIState.FAILED: "Failed",
    AIState.NO_MODEL: "No model applies",
}


class SortKey(StrEnum):
    RECEIVED = "received"  # when the study's first instance arrived
    STUDY_DATE = "study_date"
    PATIENT_NAME = "patient_name"
    PATIENT_ID = "patient_id"
    ACCESSION = "accession"
    MODALITY = "modality"


_SORT_COLUMNS: dict[SortKey, Any] = {
    SortKey.RECEIVED: Study.created_at,
    SortKey.STUDY_DATE: Study.study_date + Study.study_time,
    SortKey.PATIENT_NAME: Patient.patient_name_upper,
    SortKey.PATIENT_ID: Patient.patient_id,
    SortKey.ACCESSION: Study.accession_number,
    SortKey.MODALITY: Study.modalities_in_study,
}


@dataclass(frozen=True)
class WorklistRequest:
    """Filters as DICOM matching values (PS3.4 C.2.2.2), the AI state, the sort and a cursor."""

    matching: Mapping[str, str]  # PatientName, PatientID, AccessionNumber, StudyDate, ...
    ai_state: AIState | None = None
    finding: str | None = None  # a present AI finding of this name (e.g. "Lesion"), any case
    sort: SortKey = SortKey.RECEIVED
    descending: bool = True
    cursor: str | None = None
    limit: int = 50
    case_insensitive_person_names: bool = True


@dataclass(frozen=True)
class WorklistStudy:
    study_instance_uid: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_description: str
    modalities: list[str]
    received_at: datetime
    stat: bool  # its AI jobs were queued with a raised priority
    ai_state: AIState
    findings: int  # present findings of its done jobs
    accepted: int  # findings whose latest decision is "accepted"
    rejected: int  # findings whose latest decision is "rejected"
    ai_note: str = ""  # why no model applies (with AIState.NO_MODEL)

    def as_json(self) -> dict[str, Any]:
        return {
            "StudyInstanceUID": self.study_instance_uid,
            "PatientName": self.patient_name,
            "PatientID": self.patient_id,
            "StudyDate": self.study_date,
            "AccessionNumber": self.accession_number,
            "ModalitiesInStudy": self.modalities,
            "received_at": self.received_at.isoformat(),
            "stat": self.stat,
            "ai_state": str(self.ai_state),
            "findings": self.findings,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "ai_note": self.ai_note if self.ai_state == AIState.NO_MODEL else "",
        }


@dataclass(frozen=True)
class WorklistPage:
    studies: list[WorklistStudy]
    next_cursor: str | None  # None on the last page


def _jobs_in(*conditions: Any) -> Any:
    return exists().where(
        InferenceJob.partition == Study.partition,
        InferenceJob.study_instance_uid == Study.study_instance_uid,
        *conditions,
    )


def _stat() -> Any:
    # STAT: the study's jobs were queued with a raised priority ([inference.priority]); the
    # study's own column (set by storage.jobs.enqueue), indexed with created_at for the first page.
    return Study.ai_priority


def _ai_state() -> Any:
    """The AI state as one SQL expression, so that the worklist can filter on it."""
    unstable = or_(
        Study.stable_last_instance_at.is_(None),
        Study.stable_last_instance_at != Study.last_instance_at,
    )
    return case(
        (_jobs_in(InferenceJob.state == JobState.RUNNING), literal(AIState.RUNNING.value)),
        (_jobs_in(InferenceJob.state == JobState.QUEUED), literal(AIState.QUEUED.value)),
        # The results a job stores make its study unstable again: only a study without any
        # job yet is "waiting" for that reason.
        (and_(unstable, ~_jobs_in()), literal(AIState.WAITING.value)),
        (_jobs_in(InferenceJob.state == JobState.FAILED), literal(AIState.FAILED.value)),
        (_jobs_in(InferenceJob.findings > 0), literal(AIState.FINDINGS.value)),
        (_jobs_in(InferenceJob.state == JobState.DONE), literal(AIState.NO_FINDINGS.value)),
        (unstable, literal(AIState.WAITING.value)),
        else_=literal(AIState.NO_MODEL.value),
    )


def _ai_state_is(state: AIState) -> Any:
    """``_ai_state() == state``, written out as semi- and anti-joins so that the database can
    plan a filter on it instead of evaluating the whole CASE for every study."""
    unstable = or_(
        Study.stable_last_instance_at.is_(None),
        Study.stable_last_instance_at != Study.last_instance_at,
    )
    running = _jobs_in(InferenceJob.state == JobState.RUNNING)
    queued = _jobs_in(InferenceJob.state == JobState.QUEUED)
    failed = _jobs_in(InferenceJob.state == JobState.FAILED)
    found = _jobs_in(InferenceJob.findings > 0)
    done = _jobs_in(InferenceJob.state == JobState.DONE)
    # Every job is in one of the four states: a study with none of them has no job at all.
    conditions = {
        AIState.RUNNING: [running],
        AIState.QUEUED: [~running, queued],
        AIState.FAILED: [~running, ~queued, failed],
        AIState.FINDINGS: [~running, ~queued, ~failed, found],
        AIState.NO_FINDINGS: [~running, ~queued, ~failed, ~found, done],
        AIState.WAITING: [unstable, ~_jobs_in()],
        AIState.NO_MODEL: [~unstable, ~_jobs_in()],
    }
    return and_(*conditions[state])


def _findings() -> Any:
    return (
        select(func.coalesce(func.sum(InferenceJob.findings), 0))
        .where(
            InferenceJob.partition == Study.partition,
            InferenceJob.study_instance_uid == Study.study_instance_uid,
        )
        .scalar_subquery()
    )


def _current_decisions(decision: str) -> Any:
    """How many of the study's findings have ``decision`` as their latest decision."""
    review, newer = aliased(FindingReview), aliased(FindingReview)
    return (
        select(func.count())
        .select_from(review)
        .where(
            review.partition == Study.partition,
            review.study_instance_uid == Study.study_instance_uid,
            review.decision == decision,
            ~exists().where(
                newer.partition == review.partition,
                newer.study_instance_uid == review.study_instance_uid,
                newer.report_sop_instance_uid == review.report_sop_instance_uid,
                newer.tracking_uid == review.tracking_uid,
                newer.id > review.id,
            ),
        )
        .scalar_subquery()
    )


def search_worklist(archive: Archive, request: WorklistRequest) -> WorklistPage:
    """One page of the worklist: STAT studies first, then by the sort key, then by row id."""
    limit = max(1, min(request.limit, 500))
    query = Query(
        QueryLevel.STUDY,
        dict(request.matching),
        case_insensitive_person_names=request.case_insensitive_person_names,
    )
    stat, ai_state, key = _stat(), _ai_state(), _SORT_COLUMNS[request.sort]
    statement = where_studies_match(
        select(
            Study.id,
            Study.study_instance_uid,
            Patient.patient_name,
            Patient.patient_id,
            Patient.patient_birth_date,
            Patient.patient_sex,
            Study.study_date,
            Study.study_time,
            Study.accession_number,
            Study.study_description,
            Study.modalities_in_study,
            Study.created_at,
            Study.ai_note,
            stat.label("stat"),
            ai_state.label("ai_state"),
            _findings().label("findings"),
            _current_decisions("accepted").label("accepted"),
            _current_decisions("rejected").label("rejected"),
            key.label("sort_value"),
        ),
        archive,
        query,
    )
    if request.ai_state is not None:
        statement = statement.where(_ai_state_is(request.ai_state))
    if request.finding:
        statement = statement.where(
            exists().where(
                AIFinding.partition == Study.partition,
                AIFinding.study_instance_uid == Study.study_instance_uid,
                AIFinding.present.is_(True),
                func.upper(AIFinding.finding) == request.finding.strip().upper(),
            )
        )
    if request.cursor:
        statement = statement.where(_after(request, stat, key, _decode(request)))
    direction = (lambda c: c.desc()) if request.descending else (lambda c: c.asc())
    statement = statement.order_by(stat.desc(), direction(key), direction(Study.id))
    with archive.index.read() as session:
        rows = session.execute(statement.limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    studies = [_study(row) for row in rows]
    next_cursor = _encode(request, rows[-1]) if more and rows else None
    return WorklistPage(studies, next_cursor)


def _study(row: Any) -> WorklistStudy:
    return WorklistStudy(
        study_instance_uid=row.study_instance_uid,
        patient_name=row.patient_name,
        patient_id=row.patient_id,
        patient_birth_date=row.patient_birth_date,
        patient_sex=row.patient_sex,
        study_date=row.study_date,
        study_time=row.study_time,
        accession_number=row.accession_number,
        study_description=row.study_description,
        modalities=[m for m in row.modalities_in_study.split("\\") if m],
        received_at=as_utc(row.created_at),  # type: ignore[arg-type]
        stat=int(row.stat) > 0,
        ai_state=AIState(row.ai_state),
        findings=int(row.findings or 0),
        accepted=int(row.accepted or 0),
        rejected=int(row.rejected or 0),
        ai_note=row.ai_note or "",
    )


def _encode(request: WorklistRequest, row: Any) -> str:
    value = row.sort_value
    if isinstance(value, datetime):
        value = as_utc(value).isoformat()  # type: ignore[union-attr]
    payload = {"sort": str(request.sort), "stat": int(row.stat), "value": value, "id": row.id}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def _decode(request: WorklistRequest) -> dict[str, Any]:
    assert request.cursor is not None
    try:
        padded = request.cursor + "=" * (-len(request.cursor) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded))
        if payload["sort"] != request.sort or not isinstance(payload["id"], int):
            raise ValueError("the cursor belongs to another sort order")
        if request.sort == SortKey.RECEIVED:
            payload["value"] = datetime.fromisoformat(payload["value"])
        return payload
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidQuery(f"the page cursor is not valid ({error}); start from page 1") from None


def _after(request: WorklistRequest, stat: Any, key: Any, cursor: dict[str, Any]) -> Any:
    """Rows after the cursor's row in the order (stat desc, key, id): the keyset condition."""
    value, row_id = cursor["value"], cursor["id"]
    if request.descending:
        # One direction throughout: a row-value comparison, which the index serves.
        return tuple_(stat, key, Study.id) < tuple_(cursor["stat"], value, row_id)
    beyond = (lambda c, v: c < v) if request.descending else (lambda c, v: c > v)
    return or_(
        stat < cursor["stat"],
        and_(stat == cursor["stat"], beyond(key, value)),
        and_(stat == cursor["stat"], key == value, beyond(Study.id, row_id)),
    )


__all__ = [
    "AI_STATE_LABELS",
    "AIState",
    "SortKey",
    "WorklistPage",
    "WorklistRequest",
    "WorklistStudy",
    "search_worklist",
]
