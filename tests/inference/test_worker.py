"""The worker in-process, with the reference CT model and test plug-ins, on both backend pairs."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1

from config import Settings
from config.settings import REFERENCE_MODELS_DIR, InferenceSettings
from inference.analysis import analyse_series
from inference.phantoms import synthetic_ct_series
from inference.registry import load_models
from inference.sr import SR_SERIES_NUMBER
from inference.stability import queue_stable_studies
from inference.worker import Analyse, Worker
from storage.archive import Archive, open_archive
from storage.ingest import Origin, ingest_file
from storage.jobs import Job, JobQueue, JobState
from storage.query import Query, QueryLevel, locate_instances, search
from tests.conftest import free_port
from tests.factories import DCMTK_STORESCU, ensure_partition, write_part10
from tests.inference.plugins import failing_ct_model

SEG, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"


def worker_for(
    settings: Settings,
    archive: Archive,
    *model_dirs: Path,
    analyse: Analyse | None = None,
    name: str = "test",
    on_job_ended: Callable[[Job, float], None] | None = None,
    **inference: object,
) -> Worker:
    values = {
        **settings.inference.model_dump(),
        "stable_after_s": 0,
        "retry_backoff_s": 0,
        "models_dirs": [REFERENCE_MODELS_DIR, *model_dirs],
        **inference,
    }
    settings = settings.model_copy(update={"inference": InferenceSettings.model_validate(values)})
    models = load_models(settings.inference.models_dirs)
    return Worker(settings, archive, models, analyse=analyse, name=name, on_job_ended=on_job_ended)


def store_series(archive: Archive, folder: Path, datasets: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for ds in datasets:
        path = write_part10(ds, folder / f"{ds.SOPInstanceUID}.dcm")
        ingest_file(archive, path, Origin(calling_ae_title="CT_SCANNER"))


def results_in_study(archive: Archive, study: str) -> list[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of the SEG and SR instances in the study."""
    query = Query(QueryLevel.SERIES, {"StudyInstanceUID": study, "Modality": "SEG\\SR"})
    return sorted(
        (instance.sop_class_uid, instance.sop_instance_uid)
        for instance in locate_instances(archive, query)
    )


def run_until_idle(worker: Worker) -> list:
    ended = []
    while (job := worker.step()) is not None:
        ended.append(job)
    return ended


def test_a_job_stores_seg_and_sr_into_the_study_and_a_rerun_replaces_them(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    datasets, _mask = synthetic_ct_series(1)
    study = datasets[0].StudyInstanceUID
    store_series(archive, tmp_path / "ct", datasets)
    worker = worker_for(settings, archive)

    (job,) = run_until_idle(worker)

    assert (job.state, job.model_name, job.attempts) == (JobState.DONE, "ct_lesion_synthetic", 1)
    results = results_in_study(archive, study)
    assert sorted(cls for cls, _ in results) == [SEG, SR, SR]  # the report, the outlines
    assert sorted(job.outputs) == sorted(uid for _, uid in results)
    series = search(archive, Query(QueryLevel.SERIES, {"StudyInstanceUID": study, "Modality": ""}))
    assert sorted(s["Modality"] for s in series) == ["CT", "SEG", "SR", "SR"]
    assert run_until_idle(worker) == []  # its own results do not trigger it again

    worker.queue.rerun(job.id)
    (rerun,) = run_until_idle(worker)
    assert rerun.state == JobState.DONE and rerun.generation == job.generation + 1
    # New content under new UIDs; the previous generation's SEG and SR are deleted.
    assert not set(rerun.outputs) & set(job.outputs)
    assert sorted(uid for _, uid in results_in_study(archive, study)) == sorted(rerun.outputs)


def test_a_later_generation_that_finds_nothing_leaves_no_stale_seg(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    datasets, _mask = synthetic_ct_series(7, slices=4)
    study = datasets[0].StudyInstanceUID
    store_series(archive, tmp_path / "ct", datasets)
    worker = worker_for(settings, archive)
    (job,) = run_until_idle(worker)
    assert len(job.outputs) == 3  # SEG, SR, the lesions' outlines

    def nothing_found(*args: Any, **kwargs: Any) -> list[Dataset]:
        outputs = analyse_series(*args, **kwargs)
        return [ds for ds in outputs if ds.SeriesNumber == SR_SERIES_NUMBER]

    worker.queue.rerun(job.id)
    (rerun,) = run_until_idle(worker_for(settings, archive, analyse=nothing_found))

    (sr_uid,) = rerun.outputs
    assert results_in_study(archive, study) == [(SR, sr_uid)]


def test_a_run_whose_job_is_requeued_meanwhile_stores_nothing(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    datasets, _mask = synthetic_ct_series(8, slices=4)
    late_slice = synthetic_ct_series(8, slices=5)[0][4]  # same study and series (same seed)
    study = datasets[0].StudyInstanceUID
    store_series(archive, tmp_path / "ct", datasets)
    fresh = worker_for(settings, archive, name="fresh")
    stale_outputs: list[Dataset] = []
    fresh_jobs: list[Job] = []

    def analyse_then_new_input_arrives(*args: Any, **kwargs: Any) -> list[Dataset]:
        stale_outputs.extend(analyse_series(*args, **kwargs))
        # While the model ran: a late slice re-queues the job, and another worker runs it.
        store_series(archive, tmp_path / "late", [late_slice])
        fresh_jobs.extend(run_until_idle(fresh))
        return stale_outputs

    stale = worker_for(settings, archive, analyse=analyse_then_new_input_arrives, name="stale")
    (lost,) = run_until_idle(stale)

    (fresh_job,) = fresh_jobs
    assert (lost.generation, lost.worker) == (1, "stale")
    assert (fresh_job.state, fresh_job.generation) == (JobState.DONE, 2)
    stored = {uid for _, uid in results_in_study(archive, study)}
    assert stored == set(fresh_job.outputs)  # the fresh results, not overwritten
    assert len(stored) == 3 and not stored & {ds.SOPInstanceUID for ds in stale_outputs}


def test_a_run_that_loses_its_job_after_storing_deletes_what_it_stored(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    datasets, _mask = synthetic_ct_series(9, slices=4)
    late_slice = synthetic_ct_series(9, slices=5)[0][4]
    study = datasets[0].StudyInstanceUID
    store_series(archive, tmp_path / "ct", datasets)
    stored_before_complete = []

    def requeued_once_all_are_stored(outcomes: Sequence[object]) -> None:
        # Told after each of the worker's results is committed: after the third (the SEG and
        # both SRs), before the worker marks the job done, a late slice re-queues it.
        if len(results_in_study(archive, study)) == 3 and not stored_before_complete:
            stored_before_complete.extend(results_in_study(archive, study))
            store_series(archive, tmp_path / "late", [late_slice])
            queue_stable_studies(archive, worker.settings, worker.models)  # the next generation

    hooked = dataclasses.replace(archive, on_ingest=requeued_once_all_are_stored)
    worker = worker_for(settings, hooked)
    lost = worker.step()

    assert len(stored_before_complete) == 3  # the SEG and both SRs were stored, then the job lost
    assert results_in_study(archive, study) == []  # and what the lost run stored deleted
    (job,) = worker.queue.for_study(study)
    assert lost is not None and lost.generation == 1
    assert (job.state, job.generation) == (JobState.QUEUED, 2)

    (done,) = run_until_idle(worker)
    assert sorted(uid for _, uid in results_in_study(archive, study)) == sorted(done.outputs)


def test_the_lease_is_renewed_while_the_model_runs(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    datasets, _mask = synthetic_ct_series(10, slices=2)
    store_series(archive, tmp_path / "ct", datasets)
    second_claims: list[Job | None] = []

    def slow_model(*args: Any, **kwargs: Any) -> list[Dataset]:
        threading.Event().wait(3)  # three leases long
        second_claims.append(worker.queue.claim("another-worker"))
        return []

    worker = worker_for(settings, archive, analyse=slow_model, lease_s=1)
    (job,) = run_until_idle(worker)

    assert (job.state, job.attempts, job.worker) == (JobState.DONE, 1, "test")
    assert second_claims == [None]  # the lease never expired


def test_a_worker_survives_an_unexpected_error(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    """A bug outside any job (here in the observer told of each job's end, whose error
    leaves ``step``): logged, and the worker goes on to the next job."""
    studies = []
    for seed in (11, 12):
        datasets, _mask = synthetic_ct_series(seed, slices=2)
        store_series(archive, tmp_path / f"ct-{seed}", datasets)
        studies.append(datasets[0].StudyInstanceUID)
    ended: list[Job] = []

    def observer_that_fails_once(job: Job, _seconds: float) -> None:
        ended.append(job)
        if len(ended) == 1:
            raise RuntimeError("a bug in the observer")

    worker = worker_for(
        settings, archive, analyse=lambda *args, **kwargs: [],
        on_job_ended=observer_that_fails_once, poll_interval_s=0.1,
    )  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while [j.state for s in studies for j in worker.queue.for_study(s)] != [JobState.DONE] * 2:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(60)
    assert [job.state for job in ended] == [JobState.DONE] * 2  # the second after the error


def test_a_model_that_raises_fails_with_the_reason_and_other_jobs_run(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    failing_ct_model(tmp_path / "models")
    datasets, _mask = synthetic_ct_series(2)
    store_series(archive, tmp_path / "ct", datasets)
    worker = worker_for(settings, archive, tmp_path / "models", max_attempts=2)

    ended = run_until_idle(worker)

    jobs = {
        j.model_name: j
        for j in JobQueue(archive, settings.inference).for_study(datasets[0].StudyInstanceUID)
    }
    assert len(ended) == 3  # the failing model twice (one retry), the reference model once
    failed, done = jobs["failing_ct_test"], jobs["ct_lesion_synthetic"]
    assert (failed.state, failed.attempts) == (JobState.FAILED, 2)
    assert "deliberate failure in forward()" in failed.reason
    assert failed.outputs == []
    assert done.state == JobState.DONE and len(done.outputs) == 3


def test_a_corrupt_pixel_payload_fails_the_job_with_a_clear_reason(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    datasets, _mask = synthetic_ct_series(3, slices=4)
    broken = datasets[2]
    broken.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    # A JPEG start-of-image marker, then noise: stored as received, undecodable.
    broken.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(range(256)) * 8])
    broken["PixelData"].VR = "OB"
    store_series(archive, tmp_path / "ct", datasets)
    worker = worker_for(settings, archive)

    (job,) = run_until_idle(worker)

    assert (job.state, job.attempts) == (JobState.FAILED, 1)  # not retried: the input is bad
    assert job.reason.startswith("the input cannot be analysed: ")
    assert broken.SOPInstanceUID in job.reason
    assert results_in_study(archive, broken.StudyInstanceUID) == []


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_a_worker_leaves_the_jobs_of_models_it_lacks_to_workers_that_have_them(
    backend: str, archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    failing_ct_model(tmp_path / "models", name="only_on_another_host")
    datasets, _mask = synthetic_ct_series(4, slices=2)
    study = datasets[0].StudyInstanceUID
    store_series(archive, tmp_path / "ct", datasets)
    other_host = worker_for(settings, archive, tmp_path / "models")
    this_host = worker_for(settings, archive)  # without the test model
    # The other host's scan knows both models: it queues both jobs (and runs none here).
    queue_stable_studies(archive, other_host.settings, other_host.models, now=other_host.clock())

    ended = run_until_idle(this_host)

    assert [j.model_name for j in ended] == ["ct_lesion_synthetic"]
    jobs = {j.model_name: j for j in this_host.queue.for_study(study)}
    assert (jobs["only_on_another_host"].state, jobs["only_on_another_host"].attempts) == (
        JobState.QUEUED,
        0,
    )


def hilum_env(settings: Settings, **inference: str) -> dict[str, str]:
    s = settings.storage
    env = {
        **os.environ,
        "HILUM_SERVER__DATA_DIR": str(settings.server.data_dir),
        "HILUM_STORAGE__DATABASE_URL": s.database_url,
        "HILUM_STORAGE__BLOB_URL": s.blob_url,
        "HILUM_STORAGE__S3_ACCESS_KEY": s.s3_access_key,
        "HILUM_STORAGE__S3_SECRET_KEY": s.s3_secret_key,
    }
    env.update({f"HILUM_INFERENCE__{key.upper()}": value for key, value in inference.items()})
    return env


def test_a_worker_killed_mid_job_loses_nothing_and_duplicates_nothing(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    datasets, _mask = synthetic_ct_series(5, slices=4)
    study = datasets[0].StudyInstanceUID
    store_series(archive, tmp_path / "ct", datasets)
    env = hilum_env(settings, stable_after_s="0", lease_s="3", poll_interval_s="0.2")

    doomed = subprocess.Popen(
        [sys.executable, "-m", "tests.inference.stalling_worker"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert doomed.stdout is not None
        assert "Hilum worker" in doomed.stdout.readline()
        stalled = doomed.stdout.readline()
        assert "STALLED" in stalled, doomed.stderr.read() if doomed.stderr else ""
        (job,) = JobQueue(archive, settings.inference).for_study(study)
        assert (job.state, job.attempts) == (JobState.RUNNING, 1)
        first_results = results_in_study(archive, study)
        assert sorted(cls for cls, _ in first_results) == [SEG, SR, SR]  # stored, not marked done
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(30)

    survivor = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "worker"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while (job := JobQueue(archive, settings.inference).get(job.id)).state != JobState.DONE:
            assert survivor.poll() is None, survivor.stderr.read() if survivor.stderr else ""
            assert time.monotonic() < deadline, job
            time.sleep(0.3)
    finally:
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(60) == 0

    assert job.attempts == 2  # claimed again after the lease expired, finished once
    assert results_in_study(archive, study) == first_results  # the same SEG and SR, once
    assert sorted(job.outputs) == sorted(uid for _, uid in first_results)


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_hilum_models_list_and_a_broken_plug_in(
    backend: str, settings: Settings, tmp_path: Path
) -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "server.cli", "models", "list"],
        env=hilum_env(settings), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "ct_lesion_synthetic" in listed.stdout and "wsi_tissue_synthetic" in listed.stdout
    assert "2 models in" in listed.stdout

    broken = tmp_path / "models" / "broken"
    broken.mkdir(parents=True)
    (broken / "model.toml").write_text('name = "broken"\n')
    failed = subprocess.run(
        [sys.executable, "-m", "server.cli", "worker"],
        env=hilum_env(settings, models_dirs=f'["{tmp_path / "models"}"]'),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode == 2
    assert "model plug-in error" in failed.stderr and "model.toml" in failed.stderr


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_hilum_serve_runs_a_worker(backend: str, settings: Settings, tmp_path: Path) -> None:
    datasets, _mask = synthetic_ct_series(6, slices=4)
    files = [write_part10(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate(datasets)]
    env = hilum_env(settings, stable_after_s="0", poll_interval_s="0.2")
    env["HILUM_DIMSE__PORT"] = str(settings.dimse.port)
    env["HILUM_HTTP__PORT"] = str(free_port())
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert "Hilum is listening" in server.stdout.readline()
        sent = subprocess.run(
            [DCMTK_STORESCU, "-aec", "HILUM", "127.0.0.1", str(settings.dimse.port),
             *map(str, files)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        archive = open_archive(settings)
        try:
            queue = JobQueue(archive, settings.inference)
            deadline = time.monotonic() + 300
            while not [j for j in queue.for_study(datasets[0].StudyInstanceUID) if j.outputs]:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
            # SEG, SR and the outlines
            assert len(results_in_study(archive, datasets[0].StudyInstanceUID)) == 3
        finally:
            archive.close()
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, server.stderr.read() if server.stderr else ""


def test_the_worker_serves_every_partition_and_stores_results_in_the_source_partition(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    ensure_partition(archive.index, "hospital_a")
    hospital = archive.scoped("hospital_a")
    datasets, _mask = synthetic_ct_series(1)
    study = datasets[0].StudyInstanceUID
    store_series(hospital, tmp_path / "ct", datasets)
    # The worker gets the archive as `hilum serve` and `hilum worker` open it (default scope).
    worker = worker_for(settings, archive)

    (job,) = run_until_idle(worker)

    assert (job.state, job.partition) == (JobState.DONE, "hospital_a")
    results = results_in_study(hospital, study)
    assert sorted(cls for cls, _ in results) == [SEG, SR, SR]  # the report, the outlines
    assert sorted(job.outputs) == sorted(uid for _, uid in results)
    assert JobQueue(hospital, settings.inference).findings_of_study(study)
    # Nothing of it in the default partition: no study, no job, no result.
    assert results_in_study(archive, study) == []
    assert JobQueue(archive, settings.inference).for_study(study) == []
    assert list(search(archive, Query(QueryLevel.STUDY, {"StudyInstanceUID": study}))) == []
