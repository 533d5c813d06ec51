"""``hilum export``: studies as Part 10 files (as stored, or de-identified), the mapping back
to the originals (admin API), and a training set that the reference CT model's script trains on
for one epoch. Real processes, real files, the real worker and model; SQLite + files."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import dcmread

from config import Settings
from config.settings import REFERENCE_MODELS_DIR, InferenceSettings
from inference.phantoms import synthetic_ct_series
from server.access import Action, required_action
from server.app import create_app
from server.cli import main
from storage.archive import Archive, open_archive
from storage.audit import AuditSearch, search_records
from storage.deidentify import Deidentifier
from storage.jobs import Job, JobQueue, JobState
from storage.pseudonyms import identities
from storage.query import entity_query, locate_instances
from storage.reviews import Decision, ReviewDecision, record_review
from tests.conftest import make_settings
from tests.factories import ct_instance
from tests.inference.test_worker import run_until_idle, store_series, worker_for
from tests.server.test_cli import HILUM, hilum_env

SECRET = "a-test-secret-of-the-lung-project-0123456789"
TRAIN = REFERENCE_MODELS_DIR / "ct_lesion_synthetic" / "train.py"


@dataclass(frozen=True)
class Exported:
    settings: Settings
    config: Path
    studies: list[str]  # the two CT phantoms
    ultrasound_study: str
    jobs: list  # their done AI jobs


@pytest.fixture(scope="module")
def clinical(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Two CT phantoms, each with the CT model's SEG and SR, a reviewer's rejection of one
    finding, and an ultrasound study (held back by de-identification)."""
    tmp = tmp_path_factory.mktemp("export")
    secret = tmp / "lung.key"
    secret.write_text(SECRET)
    config = tmp / "hilum.toml"
    settings = make_settings(tmp, research={"projects": [{"name": "lung", "secret_file": secret}]})
    config.write_text(
        f'[server]\ndata_dir = "{settings.server.data_dir}"\n'
        f'[[research.projects]]\nname = "lung"\nsecret_file = "{secret}"\n'
    )
    archive = open_archive(settings, migrate=True)
    try:
        studies = []
        for seed in (1, 2):
            datasets, _ = synthetic_ct_series(seed, slices=8, size=64)
            store_series(archive, tmp / f"ct{seed}", datasets)
            studies.append(datasets[0].StudyInstanceUID)
        jobs = run_until_idle(worker_for(settings, archive))
        assert [job.state for job in jobs] == [JobState.DONE, JobState.DONE]
        _reject_first_finding(archive, jobs[1])
        ultrasound = ct_instance(modality="US", patient_id="PAT-US")
        store_series(archive, tmp / "us", [ultrasound])
    finally:
        archive.close()
    return Exported(settings, config, studies, ultrasound.StudyInstanceUID, jobs)


def _reject_first_finding(archive: Archive, job: Job) -> None:
    _, finding = JobQueue(archive, InferenceSettings()).findings_of_study(job.study_instance_uid)[0]
    record_review(
        archive,
        ReviewDecision(
            study_instance_uid=job.study_instance_uid,
            job_id=job.id,
            model_name=job.model_name,
            model_version=job.model_version,
            report_sop_instance_uid=finding.report_sop_instance_uid,
            tracking_uid=finding.tracking_uid,
            finding=finding.finding,
            decision=Decision.REJECTED,
            reviewer="READER^ONE",
            comment="",
            decided_at=datetime.now(UTC),
            review_sop_instance_uid="1.2.826.0.1.3680043.10.9.1",
        ),
    )


def _hilum(exported: Exported, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HILUM, "--config", str(exported.config), *args],
        env=hilum_env(exported.settings),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm"))


def test_export_as_stored_writes_the_bytes_received(clinical: Exported, tmp_path: Path) -> None:
    done = _hilum(clinical, "export", clinical.studies[0], "--to", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    archive = open_archive(clinical.settings)
    try:
        stored = list(locate_instances(archive, entity_query(clinical.studies[0])))
        for instance in stored:
            path = (
                tmp_path / "out" / instance.study_instance_uid / instance.series_instance_uid
                / f"{instance.sop_instance_uid}.dcm"
            )  # fmt: skip
            with archive.blobs.open(instance.blob_key) as blob:
                assert path.read_bytes() == blob.read()
    finally:
        archive.close()
    outputs = len(clinical.jobs[0].outputs)  # the AI's SEG and SR(s)
    assert len(_files(tmp_path / "out")) == len(stored) == 8 + outputs
    assert f"{len(stored)} instances of 1 studies written" in done.stdout
    # The export is in the audit trail (PS3.15 A.5.3.4 Data Export), by the shell's user.
    archive = open_archive(clinical.settings)
    try:
        (record,) = [
            r
            for r in search_records(archive.index, AuditSearch(study=clinical.studies[0]))
            if r["event"] == "export"
        ]
    finally:
        archive.close()
    assert record["principal_name"].startswith("os:") and record["transport"] == "cli"
    assert record["instances"] == len(stored) and str(tmp_path / "out") in record["detail"]


def test_deidentified_export_round_trip(clinical: Exported, tmp_path: Path) -> None:
    out = tmp_path / "deid"
    done = _hilum(
        clinical, "export", *clinical.studies, clinical.ultrasound_study,
        "--to", str(out), "--deidentify", "--project", "lung",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "held back" in done.stdout and "modality US" in done.stdout
    project = Deidentifier("lung", SECRET.encode())
    files = _files(out)
    # Both CT studies with their AI results; the ultrasound instance is not written.
    assert len(files) == sum(8 + len(job.outputs) for job in clinical.jobs)
    for path in files:
        # DCMTK reads it as a Part 10 file.
        check = subprocess.run(["dcmftest", str(path)], capture_output=True, text=True)
        assert check.stdout.startswith("yes:"), check.stdout
        # dicom3tools checks it against its IOD: de-identification broke nothing.
        iod = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in iod.stderr.splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"
        ds = dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.StudyInstanceUID in {project.new_uid(uid) for uid in clinical.studies}
        assert path.parent.name == ds.SeriesInstanceUID
        assert path.stem == ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert not str(ds.PatientID).startswith("PHANTOM")
    # The mapping back lives in the clinical partition and answers the admin API.
    archive = open_archive(clinical.settings)
    try:
        found = identities(archive, project="lung")
        assert sorted(i.study_instance_uid for i in found) == sorted(clinical.studies)
        client = create_app(clinical.settings, archive).test_client()
        new_study = project.new_uid(clinical.studies[0])
        answer = client.get(f"/api/research/identities?study={new_study}")
        assert answer.status_code == 200
        (identity,) = answer.get_json()
        assert identity["StudyInstanceUID"] == clinical.studies[0]
        assert identity["PatientID"] == "PHANTOM-CT-1"
        by_name = client.get(f"/api/research/identities?pseudonym={identity['pseudonym']}")
        assert [i["StudyInstanceUID"] for i in by_name.get_json()] == [clinical.studies[0]]
        assert client.get("/api/research/identities").status_code == 400
        view = create_app(clinical.settings, archive).view_functions["research.find_identities"]
        assert required_action(view) is Action.ADMIN
    finally:
        archive.close()


def test_export_refuses_unknown_projects_and_studies(
    clinical: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def export(*args: str) -> tuple[int, str, str]:
        status = main(["--config", str(clinical.config), "export", *args])
        out, err = capsys.readouterr()
        return status, out, err

    study = clinical.studies[0]
    status, _, err = export(study, "--to", str(tmp_path / "a"), "--deidentify", "--project", "no")
    assert status == 2 and "[[research.projects]] (lung)" in err
    status, _, err = export(study, "--to", str(tmp_path / "a"), "--project", "lung")
    assert status == 2 and "--deidentify needs --project" in err
    status, _, err = export("--to", str(tmp_path / "a"))
    assert status == 2 and "give STUDY_UIDs, or --dataset" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    status, _, err = export(study, "--to", str(tmp_path / "full"))
    assert status == 2 and "is not an empty folder" in err
    status, out, _ = export("1.2.3.4.5", "--to", str(tmp_path / "b"))
    assert status == 1 and "no such study 1.2.3.4.5" in out
    status, _, err = export("not-a-uid", "--to", str(tmp_path / "c"))
    assert status == 3 and "not a Study Instance UID" in err


@pytest.mark.slow  # 20 to 35 s on 2 shared cores: two processes, torch imported in one
def test_training_set_trains_the_reference_ct_model_for_one_epoch(
    clinical: Exported, tmp_path: Path
) -> None:
    out = tmp_path / "training"
    done = _hilum(
        clinical, "export", "--dataset", "--partition", "default", "--to", str(out),
        "--deidentify", "--project", "lung",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "hilum-training-set/1" and manifest["deidentified"] == "lung"
    ct = [s for s in manifest["series"] if s["Modality"] == "CT"]
    assert len(ct) == 2 and all(len(s["images"]) == 8 for s in ct)
    for series in ct:
        (label,) = series["labels"]
        assert label["model"]["name"] == "ct_lesion_synthetic"
        assert label["segmentation"].startswith("labels/") and label["report"].startswith("labels/")
        seg = dcmread(out / label["segmentation"])
        assert seg.Modality == "SEG" and seg.StudyInstanceUID == series["StudyInstanceUID"]
        assert all((out / p).is_file() for p in series["images"] + label["files"])
        tracking = {item.TrackingUID for item in seg.SegmentSequence}
        assert {f["tracking_uid"] for f in label["findings"] if f["present"]} <= tracking
    decisions = [f["decision"] for s in ct for f in s["labels"][0]["findings"] if f["decision"]]
    assert [d["decision"] for d in decisions] == ["rejected"]
    (us,) = [s for s in manifest["series"] if s["Modality"] == "US"] or [None]
    assert us is None  # held back: no image written, so no series listed
    model = tmp_path / "model.pt"
    trained = subprocess.run(
        [sys.executable, str(TRAIN), "--dataset", str(out), "--epochs", "1", "--batch", "8",
         "--output", str(model)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "16 slices" in trained.stdout and "2 steps" in trained.stdout
    assert model.stat().st_size > 10_000
