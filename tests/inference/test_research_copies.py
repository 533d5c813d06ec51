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
from storage.archive import Archive
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
from storage.jobs import JobState
from storage.pseudonyms import identities
from storage.query import Query, QueryLevel, locate_instances, search
from tests.conftest import make_settings
from tests.inference.test_worker import run_until_idle, store_series, worker_for

SECRET = "research-copies-test-secret-0123456789"


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


@pytest.mark.parametrize("backend", ["postgresql-s3"], indirect=True)
def test_a_research_copy_rule_fills_the_research_partition_without_identifiers(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    settings = _settings(settings, tmp_path)
    _create_partition(archive, "research")
    datasets, _ = synthetic_ct_series(5, slices=8, size=64)
    store_series(archive, tmp_path / "ct", datasets)
    worker = worker_for(settings, archive)

    ended = run_until_idle(worker)

    copies = [job for job in ended if job.model_name == "research-copy:lung:research"]
    assert copies and copies[-1].state == JobState.DONE
    clinical = list(locate_instances(archive, Query(QueryLevel.STUDY, {})))
    research = archive.scoped("research")
    copied = list(locate_instances(research, Query(QueryLevel.STUDY, {})))
    assert len(copied) == len(clinical) == 8 + 2  # the CT slices, the AI's SEG and SR
    assert sorted(i.sop_class_uid for i in copied) == sorted(i.sop_class_uid for i in clinical)
    # Scan every stored attribute of the copies for the originals' identifiers.
    originals = _identifiers(datasets) | {i.sop_instance_uid for i in clinical}
    stored = _stored_text(research)
    leaks = {value for value in originals for text in stored if value in text}
    assert not leaks, f"original identifiers in the research partition: {sorted(leaks)[:5]}"
    in_clinical = {value for value in originals for text in _stored_text(archive) if value in text}
    assert in_clinical == originals  # the same scan finds every one of them where they are
    # The AI results come along as rows of the research partition, under the new UIDs.
    (study,) = search(research, Query(QueryLevel.STUDY, {}))
    (job,) = [j for j in worker.queue.for_study(datasets[0].StudyInstanceUID)
              if j.model_name == "ct_lesion_synthetic"]  # fmt: skip
    with research.index.read() as session:
        findings = session.scalars(select(AIFinding).where(AIFinding.partition == "research")).all()
    assert findings and all(f.study_instance_uid == study["StudyInstanceUID"] for f in findings)
    assert len(findings) == len(worker.queue.findings_of_study(job.study_instance_uid))
    # The way back stays in the clinical partition; the research partition has none of it.
    (identity,) = identities(archive, project="lung")
    assert identity.deidentified_study_uid == study["StudyInstanceUID"]
    assert identities(research) == []
    # A copy already made is not made again while nothing new arrives.
    assert run_until_idle(worker) == []


@pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)
def test_reviewed_rule_waits_for_a_review_and_a_missing_partition_fails_the_job(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    settings = _settings(settings, tmp_path, when="reviewed")
    datasets, _ = synthetic_ct_series(6, slices=4, size=32)
    store_series(archive, tmp_path / "ct", datasets)
    worker = worker_for(settings, archive)
    ended = run_until_idle(worker)
    assert not [job for job in ended if job.model_name.startswith("research-copy:")]
    with archive.index.write() as session:  # a reviewer's decision (the index row)
        job = session.scalars(select(InferenceJob)).first()
        assert job is not None
        session.add(
            FindingReview(
                partition="default", study_instance_uid=job.study_instance_uid, job_id=job.id,
                model_name=job.model_name, model_version=job.model_version,
                report_sop_instance_uid="1.2.3", tracking_uid="1.2.4", finding="Lesion",
                decision="accepted", reviewer="READER^ONE", comment="", decided_at=job.created_at,
                review_sop_instance_uid="1.2.5",
            )
        )  # fmt: skip
    (copy,) = run_until_idle(worker)
    assert copy.state == JobState.FAILED  # no partition "research": said, not retried
    assert "partition 'research' does not exist" in copy.reason
