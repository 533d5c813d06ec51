"""The worklist query, on both backend pairs: the AI state derived from a study's jobs, STAT
first, each filter, and keyset paging that neither skips nor repeats a study in any sort order."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update

from storage.archive import Archive
from storage.errors import InvalidQuery
from storage.index.models import Study
from storage.ingest import Origin, ingest_file
from storage.jobs import enqueue, utc_now
from storage.reviews import Decision, ReviewDecision, record_review
from storage.worklist import AIState, SortKey, WorklistRequest, search_worklist
from tests.factories import ct_instance, write_part10


def store_study(archive: Archive, tmp_path: Path, *, modality: str = "CT", **values: str) -> str:
    ds = ct_instance(modality=modality, patient_id=values.pop("PatientID", "PAT-1"))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ingest_file(archive, write_part10(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm"), Origin())
    return str(ds.StudyInstanceUID)


def mark_stable(archive: Archive, study: str) -> None:
    with archive.index.write() as session:
        session.execute(
            update(Study)
            .where(Study.study_instance_uid == study)
            .values(stable_last_instance_at=Study.last_instance_at)
        )


def add_job(
    archive: Archive, study: str, state: str, *, findings: int | None = None, priority: int = 0
) -> None:
    """A job queued as the stability scan queues it (storage.jobs.enqueue), then put in
    ``state``."""
    now = utc_now()
    with archive.index.write() as session:
        row = enqueue(
            session,
            archive.partition,
            study_instance_uid=study,
            series_instance_uid=generate_uid(),
            model_name="test-model",
            model_version="1",
            priority=priority,
            input_received_at=now,
            now=now,
        )
        row.state = state
        row.findings = findings


def states(archive: Archive, **request: object) -> dict[str, AIState]:
    page = search_worklist(archive, WorklistRequest(matching={}, limit=500, **request))  # type: ignore[arg-type]
    return {s.study_instance_uid: s.ai_state for s in page.studies}


def test_the_ai_state_of_a_study_follows_its_jobs(archive: Archive, tmp_path: Path) -> None:
    study = {name: store_study(archive, tmp_path) for name in AIState}
    for name in AIState:
        if name != AIState.WAITING:
            mark_stable(archive, study[name])
    add_job(archive, study[AIState.QUEUED], "queued")
    add_job(archive, study[AIState.RUNNING], "running")
    add_job(archive, study[AIState.RUNNING], "done", findings=1)  # running wins over done
    add_job(archive, study[AIState.FAILED], "failed")
    add_job(archive, study[AIState.FINDINGS], "done", findings=2)
    add_job(archive, study[AIState.FINDINGS], "done", findings=0)
    add_job(archive, study[AIState.NO_FINDINGS], "done", findings=0)
    assert states(archive) == {uid: name for name, uid in study.items()}
    for name in AIState:
        assert list(states(archive, ai_state=name)) == [study[name]]

    # The results a job stores make its study unstable again: its state stays the job's.
    with archive.index.write() as session:
        session.execute(
            update(Study)
            .where(Study.study_instance_uid == study[AIState.FINDINGS])
            .values(last_instance_at=Study.last_instance_at + timedelta(seconds=5))
        )
    assert states(archive)[study[AIState.FINDINGS]] == AIState.FINDINGS
    page = search_worklist(archive, WorklistRequest(matching={}, limit=500))
    (findings,) = [s for s in page.studies if s.study_instance_uid == study[AIState.FINDINGS]]
    assert findings.findings == 2


def test_stat_studies_come_first_then_newest(archive: Archive, tmp_path: Path) -> None:
    first, stat, last = (store_study(archive, tmp_path) for _ in range(3))
    add_job(archive, stat, "queued", priority=100)
    page = search_worklist(archive, WorklistRequest(matching={}))
    assert [s.study_instance_uid for s in page.studies] == [stat, last, first]
    assert [s.stat for s in page.studies] == [True, False, False]
    oldest_first = search_worklist(archive, WorklistRequest(matching={}, descending=False))
    assert [s.study_instance_uid for s in oldest_first.studies] == [stat, first, last]


def test_each_filter_narrows_the_list(archive: Archive, tmp_path: Path) -> None:
    doe = store_study(
        archive, tmp_path, PatientName="DOE^JANE", PatientID="P1", AccessionNumber="A1",
        StudyDate="20260101",
    )  # fmt: skip
    roe = store_study(
        archive, tmp_path, PatientName="ROE^RICHARD", PatientID="P2", AccessionNumber="A2",
        StudyDate="20260301", modality="MR",
    )  # fmt: skip
    everything = {doe, roe}

    def found(**matching: str) -> set[str]:
        page = search_worklist(archive, WorklistRequest(matching=matching))
        return {s.study_instance_uid for s in page.studies}

    assert found() == everything
    assert found(PatientName="doe*") == {doe}  # Person Names ignore case (the default)
    assert found(PatientID="P2") == {roe}
    assert found(AccessionNumber="A1") == {doe}
    assert found(StudyDate="20260201-") == {roe}
    assert found(StudyDate="-20260201") == {doe}
    assert found(ModalitiesInStudy="MR") == {roe}
    assert found(PatientName="NOBODY*") == set()
    with pytest.raises(InvalidQuery):
        found(StudyDate="2026-01-01")


def test_keyset_pages_cover_every_study_once_in_every_order(
    archive: Archive, tmp_path: Path
) -> None:
    names = ["ADAMS", "BAKER", "BAKER", "CLARK", "DAVIS", "EVANS", "BAKER"]
    studies = [
        store_study(
            archive, tmp_path, PatientName=f"{name}^X", PatientID=f"P{i % 3}",
            AccessionNumber=f"A{i % 2}", StudyDate=f"2026010{i % 4 + 1}",
            modality="MR" if i % 2 else "CT",
        )
        for i, name in enumerate(names)
    ]  # fmt: skip
    add_job(archive, studies[4], "queued", priority=100)
    for sort in SortKey:
        for descending in (True, False):
            whole = search_worklist(
                archive, WorklistRequest(matching={}, sort=sort, descending=descending, limit=100)
            )
            assert whole.next_cursor is None
            paged, cursor = [], None
            while True:
                page = search_worklist(
                    archive,
                    WorklistRequest(
                        matching={}, sort=sort, descending=descending, limit=3, cursor=cursor
                    ),
                )
                paged += [s.study_instance_uid for s in page.studies]
                cursor = page.next_cursor
                if cursor is None:
                    break
            order = f"{sort} {'descending' if descending else 'ascending'}"
            assert paged == [s.study_instance_uid for s in whole.studies], order
            assert sorted(paged) == sorted(studies), order
            assert paged[0] == studies[4], order  # STAT first in every order


def test_a_cursor_of_another_sort_or_garbage_is_refused(archive: Archive, tmp_path: Path) -> None:
    for _ in range(3):
        store_study(archive, tmp_path)
    page = search_worklist(archive, WorklistRequest(matching={}, limit=1))
    assert page.next_cursor
    with pytest.raises(InvalidQuery, match="cursor"):
        search_worklist(
            archive,
            WorklistRequest(matching={}, sort=SortKey.PATIENT_ID, cursor=page.next_cursor),
        )
    with pytest.raises(InvalidQuery, match="cursor"):
        search_worklist(archive, WorklistRequest(matching={}, cursor="not-a-cursor"))


def test_the_worklist_counts_each_findings_current_decision(
    archive: Archive, tmp_path: Path
) -> None:
    study = store_study(archive, tmp_path)
    start = utc_now()

    def decide(tracking_uid: str, decision: Decision, minutes: int) -> None:
        record_review(
            archive,
            ReviewDecision(
                study_instance_uid=study, job_id=None, model_name="m", model_version="1",
                report_sop_instance_uid="1.2.3", tracking_uid=tracking_uid, finding="Lesion",
                decision=decision, reviewer="Dr X", comment="",
                decided_at=start + timedelta(minutes=minutes), review_sop_instance_uid="1.2.9",
            ),
        )  # fmt: skip

    decide("1.1", Decision.ACCEPTED, 0)
    decide("1.1", Decision.REJECTED, 1)  # changed its mind: rejected now
    decide("1.2", Decision.ACCEPTED, 2)
    (listed,) = search_worklist(archive, WorklistRequest(matching={})).studies
    assert (listed.accepted, listed.rejected) == (1, 1)
