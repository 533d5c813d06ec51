"""The job queue and study stability, on both backend pairs."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from config import Settings
from config.settings import InferenceSettings
from inference.registry import Model, ModelManifest
from inference.stability import queue_stable_studies
from storage.archive import Archive
from storage.errors import Conflict, InvalidQuery, NotFound
from storage.ingest import Origin, ingest_file
from storage.jobs import JobFinding, JobQueue, JobState, utc_now
from tests.factories import ct_instance, write_part10

LATER = timedelta(hours=1)  # a scan "an hour from now" sees every study as stable


class TestClock:
    """A clock that moves only when told: leases expire and backoffs pass without waiting."""

    __test__ = False  # not a test class

    def __init__(self) -> None:
        self.now = utc_now()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def model_for(name: str, modalities: list[str]) -> Model:
    """A registered model as the registry builds it; its weights are never loaded here."""
    code = {"scheme": "SCT", "value": "108369006", "meaning": "Neoplasm"}
    manifest = ModelManifest.model_validate(
        {
            "name": name,
            "version": "1.0",
            "algorithm_name": name,
            "kind": "slice",
            "applies_to": {"modalities": modalities},
            "labels": [{"label": "lesion", "category": code, "type": code, "finding_type": code}],
        }
    )
    return Model(name, "1.0", Path("/nonexistent"), manifest)


CT_MODEL = model_for("test-ct", ["CT"])
WSI_MODEL = model_for("test-wsi", ["SM"])


def with_inference(settings: Settings, **values: object) -> Settings:
    inference = InferenceSettings.model_validate({**settings.inference.model_dump(), **values})
    return settings.model_copy(update={"inference": inference})


def store(
    archive: Archive, tmp_path: Path, ds: Dataset, *, calling_ae_title: str = "CT_SCANNER"
) -> None:
    path = write_part10(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm")
    ingest_file(archive, path, Origin(calling_ae_title=calling_ae_title))


def ct_series(
    archive: Archive, tmp_path: Path, count: int = 2, **kwargs: object
) -> tuple[str, str]:
    study, series = generate_uid(), generate_uid()
    for i in range(count):
        ds = ct_instance(study, series, seed=i)
        for keyword, value in kwargs.items():
            setattr(ds, keyword, value)
        store(archive, tmp_path, ds)
    return study, series


def scan(archive: Archive, settings: Settings, later: timedelta = LATER) -> list:
    return queue_stable_studies(archive, settings, [CT_MODEL, WSI_MODEL], now=utc_now() + later)


def test_a_stable_study_queues_the_models_its_rules_pick(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    study, series = ct_series(archive, tmp_path)

    assert scan(archive, settings, later=timedelta(0)) == []  # not stable yet (30 s default)
    queued = scan(archive, settings)

    assert [(j.study_instance_uid, j.series_instance_uid, j.model_name) for j in queued] == [
        (study, series, "test-ct")
    ]
    assert queued[0].state == JobState.QUEUED and queued[0].priority == 0
    assert scan(archive, settings) == []  # marked stable in the same transaction
    assert [j.id for j in JobQueue(archive, settings.inference).for_study(study)] == [queued[0].id]


def test_rules_in_the_settings_narrow_what_the_manifests_accept(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    ct_series(archive, tmp_path, BodyPartExamined="HEAD")
    chest_only = with_inference(
        settings, rules=[{"model": "test-ct", "body_parts_examined": ["chest"]}]
    )
    assert scan(archive, chest_only) == []

    _study, chest = ct_series(archive, tmp_path, BodyPartExamined="CHEST")
    assert [j.series_instance_uid for j in scan(archive, chest_only)] == [chest]


def test_new_instances_requeue_but_results_do_not_retrigger(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    study, series = ct_series(archive, tmp_path)
    queue = JobQueue(archive, settings.inference)
    (job,) = scan(archive, settings)
    claimed = queue.claim("w1")
    assert claimed is not None and claimed.id == job.id
    assert queue.complete(claimed, "w1", model_version="1.0", outputs=["1.2.3"])

    # The worker's results arrive in the study (from Hilum's own AE title, Modality SEG is
    # analysed by nobody; a CT-looking result series would be skipped all the same).
    result = ct_instance(study, generate_uid(), seed=7)
    store(archive, tmp_path, result, calling_ae_title=settings.dimse.ae_title)
    assert scan(archive, settings) == []
    assert queue.get(job.id).state == JobState.DONE

    # A late slice of the analysed series queues the same job again, with fresh attempts, as
    # its next generation (new output UIDs).
    store(archive, tmp_path, ct_instance(study, series, seed=9))
    (again,) = scan(archive, settings)
    assert again.id == job.id and again.job_key == job.job_key
    assert (again.state, again.attempts, again.outputs) == (JobState.QUEUED, 0, ["1.2.3"])
    assert (job.generation, again.generation) == (1, 2)
    assert again.output_key != job.output_key


class _BrokenOnOneBodyPart(Model):
    """An installed model whose ``applies_to`` fails on one series' metadata (a bug in a
    plug-in's code or an unexpected value), as the scan meets it for that study alone."""

    def applies_to(self, series: Mapping[str, str]) -> bool:
        if series.get("BodyPartExamined") == "UNEXPECTED":
            raise RuntimeError("unexpected metadata")
        return super().applies_to(series)


def test_a_study_whose_scan_fails_does_not_keep_the_others_from_being_queued(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    bad_study, _bad_series = ct_series(archive, tmp_path, BodyPartExamined="UNEXPECTED")
    _good_study, good_series = ct_series(archive, tmp_path)
    broken = _BrokenOnOneBodyPart(CT_MODEL.name, CT_MODEL.version, CT_MODEL.path, CT_MODEL.manifest)
    later = utc_now() + LATER
    queued = queue_stable_studies(archive, settings, [broken, WSI_MODEL], now=later)
    assert [j.series_instance_uid for j in queued] == [good_series]

    # Fixed (the model updated): the study is queued at the next scan.
    assert [j.study_instance_uid for j in scan(archive, settings)] == [bad_study]


def test_a_worker_claims_only_jobs_of_the_models_it_has(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    ct_series(archive, tmp_path)
    (job,) = scan(archive, settings)
    queue = JobQueue(archive, settings.inference)

    assert queue.claim("wsi-only", ["test-wsi"]) is None
    assert queue.claim("no-models", []) is None
    claimed = queue.claim("ct", ["test-ct", "test-wsi"])
    assert claimed is not None and claimed.id == job.id


def test_stat_studies_jump_the_queue(archive: Archive, settings: Settings, tmp_path: Path) -> None:
    settings = with_inference(
        settings,
        priority={
            "stat_calling_ae_titles": ["ER_CT"],
            "stat_requested_procedure_priorities": ["STAT"],
        },
    )
    _routine, routine_series = ct_series(archive, tmp_path)
    _stat, stat_series = ct_series(archive, tmp_path, RequestedProcedurePriority="STAT")
    er_study, er_series = generate_uid(), generate_uid()
    store(archive, tmp_path, ct_instance(er_study, er_series), calling_ae_title="ER_CT")

    queued = {j.series_instance_uid: j.priority for j in scan(archive, settings)}
    assert queued == {routine_series: 0, stat_series: 100, er_series: 100}

    queue = JobQueue(archive, settings.inference)
    order = [queue.claim("w").series_instance_uid for _ in range(3)]  # type: ignore[union-attr]
    assert order == [stat_series, er_series, routine_series]  # STAT first, then oldest first
    assert queue.claim("w") is None


def test_failed_attempts_are_retried_with_backoff_then_fail_with_the_reason(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    ct_series(archive, tmp_path)
    (job,) = scan(archive, settings)
    clock = TestClock()
    queue = JobQueue(archive, InferenceSettings(max_attempts=3, retry_backoff_s=30), clock=clock)

    def back_off_and_wait_it_out(attempt: int, backoff_s: int) -> None:
        claimed = queue.claim(f"w{attempt}")
        assert claimed is not None and claimed.attempts == attempt
        retried = queue.fail(claimed, f"w{attempt}", "RuntimeError: CUDA out of memory", retry=True)
        assert retried is not None and retried.state == JobState.QUEUED
        assert retried.generation == job.generation  # a retry stores the same UIDs
        assert retried.not_before == clock() + timedelta(seconds=backoff_s)
        assert retried.reason == "RuntimeError: CUDA out of memory"
        clock.advance(backoff_s - 1)
        assert queue.claim("w") is None  # still backing off
        clock.advance(1)  # the backoff has passed

    back_off_and_wait_it_out(1, 30)
    back_off_and_wait_it_out(2, 60)  # doubled
    third = queue.claim("w3")
    assert third is not None
    failed = queue.fail(third, "w3", "RuntimeError: CUDA out of memory", retry=True)
    assert failed is not None
    assert (failed.state, failed.attempts) == (JobState.FAILED, 3)
    assert failed.reason == "RuntimeError: CUDA out of memory"
    assert failed.finished_at == clock()
    assert queue.claim("w4") is None


def test_a_permanent_failure_is_not_retried(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    ct_series(archive, tmp_path)
    (job,) = scan(archive, settings)
    queue = JobQueue(archive, InferenceSettings(max_attempts=3, retry_backoff_s=0))
    claimed = queue.claim("w1")
    assert claimed is not None
    failed = queue.fail(claimed, "w1", "the input cannot be analysed: corrupt", retry=False)
    assert failed is not None and (failed.state, failed.attempts) == (JobState.FAILED, 1)


def test_an_expired_lease_lets_another_worker_claim_the_job(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    ct_series(archive, tmp_path)
    (job,) = scan(archive, settings)
    clock = TestClock()
    normal = JobQueue(archive, InferenceSettings(lease_s=60, max_attempts=2), clock=clock)

    first = normal.claim("killed")
    assert first is not None
    clock.advance(59)
    assert normal.claim("survivor") is None  # leased
    clock.advance(2)  # the killed worker renewed nothing: its lease expired
    second = normal.claim("survivor")
    assert second is not None and (second.id, second.attempts) == (job.id, 2)
    assert second.worker == "survivor"
    # The same generation: the survivor stores the UIDs the killed worker may have stored.
    assert second.output_key == first.output_key

    # The first worker, back from the dead, holds nothing any more.
    assert not normal.heartbeat(first, "killed")
    assert not normal.complete(first, "killed", model_version="1.0", outputs=[])
    assert normal.fail(first, "killed", "late", retry=True) is None
    assert normal.heartbeat(second, "survivor")
    assert normal.complete(second, "survivor", model_version="1.0", outputs=["1.2"])
    assert normal.get(job.id).state == JobState.DONE


def test_a_job_that_keeps_losing_its_worker_fails(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    ct_series(archive, tmp_path)
    (job,) = scan(archive, settings)
    clock = TestClock()
    queue = JobQueue(archive, InferenceSettings(lease_s=60, max_attempts=1), clock=clock)
    assert queue.claim("w1") is not None
    clock.advance(61)
    assert queue.claim("w2") is None
    failed = queue.get(job.id)
    assert failed.state == JobState.FAILED
    assert "stopped renewing its lease" in failed.reason and "w1" in failed.reason


def test_rerun(archive: Archive, settings: Settings, tmp_path: Path) -> None:
    ct_series(archive, tmp_path)
    (job,) = scan(archive, settings)
    queue = JobQueue(archive, InferenceSettings(max_attempts=1))
    unchanged = queue.rerun(job.id)  # already queued: left as it is
    assert (unchanged.state, unchanged.generation) == (JobState.QUEUED, job.generation)
    claimed = queue.claim("w1")
    assert claimed is not None
    with pytest.raises(Conflict):
        queue.rerun(job.id)
    queue.fail(claimed, "w1", "boom", retry=True)
    assert queue.get(job.id).state == JobState.FAILED

    rerun = queue.rerun(job.id)
    assert (rerun.state, rerun.attempts, rerun.reason) == (JobState.QUEUED, 0, "")
    assert rerun.job_key == job.job_key
    assert rerun.generation == job.generation + 1  # a re-run stores new UIDs
    with pytest.raises(NotFound):
        queue.rerun(job.id + 1000)


def test_concurrent_workers_claim_each_job_once(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    for _ in range(6):
        ct_series(archive, tmp_path, count=1)
    assert len(scan(archive, settings)) == 6
    queue = JobQueue(archive, settings.inference)
    claimed: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while (job := queue.claim(name)) is not None:
            with lock:
                claimed.append(job.id)
            queue.complete(job, name, model_version="1.0", outputs=[])

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(claimed) == 6 and len(set(claimed)) == 6


def test_json_api_lists_shows_and_reruns_jobs(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    from server.app import create_app

    study, series = ct_series(archive, tmp_path)
    (job,) = scan(archive, settings)
    client = create_app(settings, archive).test_client()

    listed = client.get(f"/api/studies/{study}/jobs")
    assert listed.status_code == 200
    assert [(j["id"], j["state"], j["SeriesInstanceUID"]) for j in listed.get_json()] == [
        (job.id, "queued", series)
    ]
    assert client.get(f"/api/studies/{generate_uid()}/jobs").get_json() == []

    queue = JobQueue(archive, InferenceSettings(max_attempts=1))
    claimed = queue.claim("w1")
    assert claimed is not None
    running = client.get(f"/api/jobs/{job.id}").get_json()
    assert (running["state"], running["worker"], running["model"]) == (
        "running",
        "w1",
        {"name": "test-ct", "version": "1.0"},
    )
    assert client.post(f"/api/jobs/{job.id}/rerun").status_code == 409

    queue.fail(claimed, "w1", "RuntimeError: boom", retry=True)
    failed = client.get(f"/api/jobs/{job.id}").get_json()
    assert (failed["state"], failed["reason"]) == ("failed", "RuntimeError: boom")

    rerun = client.post(f"/api/jobs/{job.id}/rerun")
    assert rerun.status_code == 202
    assert (rerun.get_json()["state"], rerun.get_json()["attempts"]) == ("queued", 0)
    assert rerun.get_json()["generation"] == 2

    missing = client.get(f"/api/jobs/{job.id + 1000}")
    assert missing.status_code == 404 and "no inference job" in missing.get_json()["error"]
    assert client.post(f"/api/jobs/{job.id + 1000}/rerun").status_code == 404


def _finding(report: str, name: str, present: bool) -> JobFinding:
    return JobFinding(
        report_sop_instance_uid=report, tracking_uid=generate_uid(), tracking_identifier=name,
        finding=name, finding_code="SCT:52988006", site="Abdomen", present=present,
        size=12.5 if present else None, size_unit="mm3" if present else "",
        segment_number=1 if present else None, segmentation_sop_instance_uid="",
    )  # fmt: skip


def test_a_done_jobs_findings_are_index_rows_replaced_by_its_next_results(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    study, _ = ct_series(archive, tmp_path)
    (job,) = scan(archive, settings)
    queue = JobQueue(archive, settings.inference)
    claimed = queue.claim("w1")
    assert claimed is not None
    found = [_finding("1.2.3", "Lesion", True), _finding("1.2.3", "Cyst", False)]
    assert queue.complete(claimed, "w1", model_version="1.0", outputs=["1.2.3"], findings=found)
    assert queue.get(job.id).findings == 1  # present ones
    assert [(j.id, f) for j, f in queue.findings_of_study(study)] == [(job.id, f) for f in found]

    queue.rerun(job.id)
    again = queue.claim("w1")
    assert again is not None
    assert queue.complete(again, "w1", model_version="1.0", outputs=["1.2.4"], findings=[])
    assert queue.findings_of_study(study) == []
    assert queue.get(job.id).findings == 0


def test_jobs_are_searched_newest_first_by_state_model_and_study(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    first, _ = ct_series(archive, tmp_path)
    second, _ = ct_series(archive, tmp_path)
    ct_series(archive, tmp_path, Modality="MR")  # no model of these reads it
    older, newer = sorted(scan(archive, settings), key=lambda j: j.id)
    queue = JobQueue(archive, settings.inference)
    claimed = queue.claim("w1")
    assert claimed is not None and claimed.id == older.id

    assert [j.id for j in queue.search()] == [newer.id, older.id]
    assert [j.id for j in queue.search(state="running")] == [older.id]
    assert [j.id for j in queue.search(state="queued")] == [newer.id]
    assert [j.id for j in queue.search(model="test-ct")] == [newer.id, older.id]
    assert queue.search(model="test-wsi") == []
    assert [j.id for j in queue.search(study_instance_uid=second)] == [
        j.id for j in (older, newer) if j.study_instance_uid == second
    ]
    assert {j.study_instance_uid for j in queue.search()} == {first, second}
    assert [j.id for j in queue.search(limit=1)] == [newer.id]
    assert [j.id for j in queue.search(before_id=newer.id)] == [older.id]
    with pytest.raises(InvalidQuery, match="state must be one of"):
        queue.search(state="finished")

    # The order workers claim in: STAT first, then oldest first.
    ct_series(archive, tmp_path, RequestedProcedurePriority="STAT")
    (stat_job,) = scan(archive, settings)
    ct_series(archive, tmp_path)
    (routine,) = scan(archive, settings)
    queued = [stat_job.id, newer.id, routine.id]
    assert [j.id for j in queue.search(state="queued", queue_order=True)] == queued
    assert [j.id for j in queue.search(state="queued")] == sorted(queued, reverse=True)


def test_a_series_complete_as_announced_is_stable_without_the_quiet_period(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    """Images in Acquisition (0020,1002) says how many instances to expect: once all of them
    are stored the study's jobs are queued at once, not stable_after_s later."""
    study, series = generate_uid(), generate_uid()

    def send(n: int) -> None:
        ds = ct_instance(study, series, seed=n)
        ds.ImagesInAcquisition = 3
        store(archive, tmp_path, ds)

    send(0)
    send(1)
    assert scan(archive, settings, later=timedelta(0)) == []  # 2 of 3: wait
    send(2)
    queued = scan(archive, settings, later=timedelta(0))
    assert [(j.series_instance_uid, j.model_name) for j in queued] == [(series, "test-ct")]
    assert scan(archive, settings, later=timedelta(0)) == []  # marked stable: once

    off = with_inference(settings, announced_completion=False)
    other, _ = ct_series(archive, tmp_path, count=1, ImagesInAcquisition=1)
    assert scan(archive, off, later=timedelta(0)) == []  # the quiet rule only
    assert [j.study_instance_uid for j in scan(archive, settings, later=timedelta(0))] == [other]
