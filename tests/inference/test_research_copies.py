"""Research copies: a ``[[research.copies]]`` rule fills the research partition with
de-identified copies through the AI worker's job queue; no original identifier reaches it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from config import Settings
from inference.phantoms import synthetic_ct_series
from server.app import create_app
from storage.accounts import Accounts
from storage.archive import Archive
from storage.audit import AuditSearch, search_records
from storage.index.models import (
    AIFinding,
    FindingReview,
    InferenceJob,
    Instance,
    Partition,
    Patient,
    Series,
    Study,
)
from storage.jobs import JobQueue, JobState
from storage.pseudonyms import identities
from storage.query import Query, QueryLevel, locate_instances, search
from storage.reviews import reviews_for_study
from tests.conftest import make_settings
from tests.inference.test_worker import run_until_idle, store_series, worker_for

SECRET = "research-copies-test-secret-0123456789"
REVIEWER = "Jane Q. Reviewer"
COMMENT = "seen with Dr Someone"


def _settings(settings: Settings, tmp_path: Path, when: str = "all") -> Settings:
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    research = make_settings(
        tmp_path,
        research={
            "projects": [{"name": "lung", "secret_file": secret}],
            "copies": [{"from": "default", "to": "research", "project": "lung", "when": when}],
        },
    ).research
    return settings.model_copy(update={"research": research})


def _create_partition(archive: Archive, name: str) -> None:
    with archive.index.write() as session:
        session.add(Partition(name=name))


def _identifiers(datasets: list) -> set[str]:
    """Every identifying value of the originals: names, IDs, accession, dates, UIDs."""
    found = set()
    for ds in datasets:
        for keyword in ("PatientName", "PatientID", "AccessionNumber", "StudyDate"):
            found.add(str(ds[keyword].value))
        for element in ds.iterall():
            if element.VR == "UI" and not str(element.value).startswith("1.2.840.10008."):
                found.add(str(element.value))
    return found


def _stored_text(archive: Archive) -> list[str]:
    """Every stored attribute of the partition: each file's every element (sequences too),
    its metadata JSON, and every index row."""
    texts = []
    for instance in locate_instances(archive, Query(QueryLevel.STUDY, {}), with_metadata=True):
        with archive.blobs.open(instance.blob_key) as blob:
            ds = dcmread(io.BytesIO(blob.read()))
        texts += [str(element.value) for element in ds.iterall() if element.VR != "SQ"]
        texts += [str(element.value) for element in ds.file_meta]
        texts.append(json.dumps(instance.metadata))
    with archive.index.read() as session:
        for model in (Patient, Study, Series, Instance, InferenceJob, AIFinding, FindingReview):
            for row in session.scalars(select(model).where(model.partition == archive.partition)):
                texts += [str(getattr(row, column.key)) for column in model.__table__.columns]
    return texts


def _review(settings: Settings, archive: Archive, study: str, decision: str) -> None:
    """A reviewer's decision through the web UI's own route: the review SR is stored into the
    study (naming the reviewer) and the decision indexed."""
    queue = JobQueue(archive, settings.inference)
    (job,) = [j for j in queue.for_study(study) if j.model_name == "ct_lesion_synthetic"]
    _, finding = queue.findings_of_study(study)[0]
    client = create_app(settings, archive).test_client()
    answer = client.post(
        f"/studies/{study}/reviews",
        data={
            "decision": decision,
            "reviewer": REVIEWER,
            "comment": COMMENT,
            "job": str(job.id),
            "tracking_uid": finding.tracking_uid,
        },
    )
    assert answer.status_code == 303, answer.get_data(as_text=True)


@pytest.mark.parametrize("backend", ["postgresql-s3"], indirect=True)
def test_a_research_copy_rule_fills_the_research_partition_without_identifiers(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    settings = _settings(settings, tmp_path, when="reviewed")
    _create_partition(archive, "research")
    datasets, _ = synthetic_ct_series(5, slices=8, size=64)
    store_series(archive, tmp_path / "ct", datasets)
    study_uid = datasets[0].StudyInstanceUID
    worker = worker_for(settings, archive)
    ended = run_until_idle(worker)
    assert [job.model_name for job in ended] == ["ct_lesion_synthetic"]  # not reviewed yet

    _review(settings, archive, study_uid, "rejected")
    ended = run_until_idle(worker)

    assert [(job.model_name, job.state) for job in ended] == [
        ("research-copy:lung:research", JobState.DONE)
    ]
    clinical = list(locate_instances(archive, Query(QueryLevel.STUDY, {})))
    research = archive.scoped("research")
    copied = list(locate_instances(research, Query(QueryLevel.STUDY, {})))
    jobs = worker.queue.for_study(study_uid)
    (model_job,) = [j for j in jobs if j.model_name == "ct_lesion_synthetic"]
    # The CT slices, the AI's SEG and SR(s), the review SR.
    assert len(copied) == len(clinical) == 8 + len(model_job.outputs) + 1
    assert sorted(i.sop_class_uid for i in copied) == sorted(i.sop_class_uid for i in clinical)
    # Scan every stored attribute of the copies for the originals' identifiers.
    originals = _identifiers(datasets) | {i.sop_instance_uid for i in clinical}
    originals |= {REVIEWER, COMMENT}
    stored = _stored_text(research)
    leaks = {value for value in originals for text in stored if value in text}
    assert not leaks, f"original identifiers in the research partition: {sorted(leaks)[:5]}"
    in_clinical = {value for value in originals for text in _stored_text(archive) if value in text}
    assert in_clinical == originals  # the same scan finds every one of them where they are
    # The AI results and the decision come along as rows of the research partition.
    (study,) = search(research, Query(QueryLevel.STUDY, {}))
    new_study = study["StudyInstanceUID"]
    research_queue = JobQueue(research, settings.inference)
    (job,) = research_queue.for_study(new_study)
    assert job.state == JobState.DONE and job.model_name == "ct_lesion_synthetic"
    assert set(job.outputs) <= {i.sop_instance_uid for i in copied}
    findings = research_queue.findings_of_study(new_study)
    assert len(findings) == len(worker.queue.findings_of_study(study_uid))
    (decision,) = reviews_for_study(research, new_study)
    assert decision.decision == "rejected" and decision.reviewer == ""
    assert decision.tracking_uid in {f.tracking_uid for _, f in findings}
    # The way back stays in the clinical partition; the research partition has none of it.
    (identity,) = identities(archive, project="lung")
    assert (identity.study_instance_uid, identity.deidentified_study_uid) == (study_uid, new_study)
    assert identities(research) == []
    # The copy is in the clinical partition's audit trail, with the source study.
    (copy,) = [
        r
        for r in search_records(archive.index, AuditSearch(study=study_uid))
        if r["event"] == "deidentified-copy"
    ]
    assert (copy["partition"], copy["transport"]) == ("default", "worker")
    assert '"to_partition":"research"' in copy["detail"]
    # Nothing new arrived: nothing is copied again.
    assert run_until_idle(worker) == []
    # A researcher's token, bound to the research partition, sees the copy there and nothing
    # of the clinical partition (a 404, as if it did not exist).
    secured = settings.model_copy(
        update={"auth": make_settings(tmp_path / "auth", auth={"enabled": True}).auth}
    )
    accounts = Accounts(archive.index)
    accounts.add_account("ada", "researcher", ["research"])
    bearer = {"Authorization": f"Bearer {accounts.create_token('ada', expires_days=1)[1]}"}
    client = create_app(secured, archive).test_client()
    found = client.get("/partitions/research/dicomweb/studies", headers=bearer)
    assert [s["0020000D"]["Value"][0] for s in found.get_json()] == [new_study]
    assert client.get("/dicomweb/studies", headers=bearer).status_code == 404
    assert client.get(f"/dicomweb/studies/{study_uid}/metadata", headers=bearer).status_code == 404
    assert client.get(
        "/api/research/identities?study=" + new_study, headers=bearer
    ).status_code in (
        403,
        404,
    )


@pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)
def test_a_copy_into_a_missing_partition_fails_with_the_reason(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    settings = _settings(settings, tmp_path, when="all")
    datasets, _ = synthetic_ct_series(6, slices=4, size=32)
    store_series(archive, tmp_path / "ct", datasets)
    ended = run_until_idle(worker_for(settings, archive))
    (copy,) = [job for job in ended if job.model_name.startswith("research-copy:")]
    assert copy.state == JobState.FAILED and copy.attempts == 1  # said, not retried
    assert "partition 'research' does not exist" in copy.reason
