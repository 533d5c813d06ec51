"""Decisions of reviewers on AI findings, kept queryable in the index.

The decision itself is a DICOM SR stored in the study through ``storage.ingest`` (the one
ingest path); the row written here is its index: which study, which finding of which model's
report, accepted or rejected, by whom, when, and the SR that records it. Rows are only ever
added; a finding's latest row is its current decision, and the history stays as the labels a
later export for retraining reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from storage.events import EventType, NewEvent, record_events
from storage.index.models import FindingReview
from storage.jobs import as_utc

if TYPE_CHECKING:
    from storage.archive import Archive


class Decision(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass(frozen=True)
class ReviewDecision:
    study_instance_uid: str
    job_id: int | None
    model_name: str
    model_version: str
    report_sop_instance_uid: str  # the model's TID 1500 SR
    tracking_uid: str  # the finding's Tracking UID in it (TID 4108)
    finding: str
    decision: Decision
    reviewer: str
    comment: str
    decided_at: datetime
    review_sop_instance_uid: str  # the SR that records the decision

    def as_json(self) -> dict[str, Any]:
        return {
            "StudyInstanceUID": self.study_instance_uid,
            "job": self.job_id,
            "model": {"name": self.model_name, "version": self.model_version},
            "report": self.report_sop_instance_uid,
            "tracking_uid": self.tracking_uid,
            "finding": self.finding,
            "decision": str(self.decision),
            "reviewer": self.reviewer,
            "comment": self.comment,
            "decided_at": self.decided_at.isoformat(),
            "review": self.review_sop_instance_uid,
        }


def record_review(archive: Archive, decision: ReviewDecision) -> None:
    """Add ``decision`` to the index (after its SR has been stored), with its ``ai.reviewed``
    event."""
    with archive.index.write() as session:
        session.add(
            FindingReview(
                partition=archive.partition,
                study_instance_uid=decision.study_instance_uid,
                job_id=decision.job_id,
                model_name=decision.model_name,
                model_version=decision.model_version,
                report_sop_instance_uid=decision.report_sop_instance_uid,
                tracking_uid=decision.tracking_uid,
                finding=decision.finding,
                decision=decision.decision.value,
                reviewer=decision.reviewer,
                comment=decision.comment,
                decided_at=decision.decided_at,
                review_sop_instance_uid=decision.review_sop_instance_uid,
            )
        )
        # The outbox: ai.reviewed commits with the decision's row (last statement).
        payload = decision.as_json()
        del payload["StudyInstanceUID"]
        record_events(
            session,
            archive.partition,
            [NewEvent(EventType.AI_REVIEWED, decision.study_instance_uid, payload)],
        )


def reviews_for_study(archive: Archive, study_instance_uid: str) -> list[ReviewDecision]:
    """The study's decisions, oldest first (so the last one of a finding is its current one)."""
    statement = (
        select(FindingReview)
        .where(
            FindingReview.partition == archive.partition,
            FindingReview.study_instance_uid == study_instance_uid,
        )
        .order_by(FindingReview.decided_at, FindingReview.id)
    )
    return [decision for _, decision in _decisions(archive, statement)]


def search_reviews(
    archive: Archive,
    *,
    decision: Decision | None = None,
    model: str | None = None,
    since: datetime | None = None,
    after_id: int | None = None,
    limit: int = 1000,
) -> list[tuple[int, ReviewDecision]]:
    """Decisions of every study, oldest first, with their row ids (the labels an export for
    retraining reads): filtered by decision, model name and time; keyset paging after an id."""
    statement = select(FindingReview).where(FindingReview.partition == archive.partition)
    if decision is not None:
        statement = statement.where(FindingReview.decision == decision.value)
    if model:
        statement = statement.where(FindingReview.model_name == model)
    if since is not None:
        statement = statement.where(FindingReview.decided_at >= since)
    if after_id is not None:
        statement = statement.where(FindingReview.id > after_id)
    statement = statement.order_by(FindingReview.id).limit(max(1, min(limit, 10_000)))
    return _decisions(archive, statement)


def _decisions(archive: Archive, statement: Any) -> list[tuple[int, ReviewDecision]]:
    with archive.index.read() as session:
        rows = session.scalars(statement).all()
        return [
            (
                row.id,
                ReviewDecision(
                    study_instance_uid=row.study_instance_uid,
                    job_id=row.job_id,
                    model_name=row.model_name,
                    model_version=row.model_version,
                    report_sop_instance_uid=row.report_sop_instance_uid,
                    tracking_uid=row.tracking_uid,
                    finding=row.finding,
                    decision=Decision(row.decision),
                    reviewer=row.reviewer,
                    comment=row.comment,
                    decided_at=as_utc(row.decided_at),  # type: ignore[arg-type]
                    review_sop_instance_uid=row.review_sop_instance_uid,
                ),
            )
            for row in rows
        ]
