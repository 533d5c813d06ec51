"""End to end, on both backend pairs: DCMTK storescu sends a synthetic CT series and a synthetic
whole-slide image to the DIMSE server, the worker runs the reference models, and the SEG and SR
appear in each study for C-FIND (DCMTK findscu), QIDO-RS and the index; highdicom reads them back
and the segmentation matches the phantom's ground truth."""

from __future__ import annotations

import io
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from config import Settings
from inference.phantoms import synthetic_ct_series, synthetic_wsi
from inference.registry import load_models
from inference.worker import Worker
from server.dimse.ae import DimseServer
from storage.archive import Archive
from storage.jobs import Job, JobQueue, JobState
from storage.query import Query, QueryLevel, locate_instances
from tests.conftest import make_settings, s3_blob_url
from tests.factories import DCMTK_STORESCU, write_part10

SEG, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"
FINDSCU = "/usr/bin/findscu"
INFERENCE = {"stable_after_s": 1, "poll_interval_s": 0.2, "retry_backoff_s": 0}


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """The conftest's settings, with studies stable after one second."""
    if backend == "sqlite-files":
        return make_settings(tmp_path, inference=INFERENCE)
    return make_settings(
        tmp_path,
        database_url=request.getfixturevalue("postgres_url"),
        blob_url=s3_blob_url(request.getfixturevalue("s3_server")),
        inference=INFERENCE,
    )


@pytest.fixture
def worker(settings: Settings, archive: Archive) -> Iterator[Worker]:
    worker = Worker(settings, archive, load_models(settings.inference.models_dirs))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(120)


def wait_for_jobs(queue: JobQueue, study: str, count: int, timeout_s: float = 400) -> list[Job]:
    """The study's jobs once ``count`` of them have ended (done or failed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = queue.for_study(study)
        if sum(job.state in (JobState.DONE, JobState.FAILED) for job in jobs) >= count:
            return jobs
        assert time.monotonic() < deadline, f"jobs did not end: {jobs}"
        time.sleep(0.5)


def read_stored(archive: Archive, study: str, sop_instance_uid: str) -> pydicom.Dataset:
    query = Query(QueryLevel.IMAGE, {"StudyInstanceUID": study, "SOPInstanceUID": sop_instance_uid})
    (instance,) = locate_instances(archive, query)
    with archive.blobs.open(instance.blob_key) as f:
        return pydicom.dcmread(io.BytesIO(f.read()))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def c_find_modalities(settings: Settings, port: int, study: str) -> list[str]:
    found = subprocess.run(
        [FINDSCU, "-S", "-aec", settings.dimse.ae_title, "-k", "QueryRetrieveLevel=SERIES",
         "-k", f"StudyInstanceUID={study}", "-k", "Modality", "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    return sorted(re.findall(r"\(0008,0060\) CS \[(\w+)", found.stdout + found.stderr))


def qido_modalities(settings: Settings, archive: Archive, study: str) -> list[str]:
    from server.app import create_app

    client = create_app(settings, archive).test_client()
    response = client.get(f"/dicomweb/studies/{study}/series")
    assert response.status_code == 200
    return sorted(series["00080060"]["Value"][0] for series in response.get_json())


def test_sent_studies_get_seg_and_sr_back_in_the_study(
    settings: Settings,
    archive: Archive,
    dimse_server: DimseServer,
    worker: Worker,
    tmp_path: Path,
) -> None:
    ct, ct_truth = synthetic_ct_series(101)
    wsi, wsi_truth = synthetic_wsi(102)
    ct_files = [write_part10(ds, tmp_path / f"ct{i}.dcm") for i, ds in enumerate(ct)]
    wsi_file = write_part10(wsi, tmp_path / "wsi.dcm")
    # The slide's frames are JPEG baseline, proposed only when asked (-xy); WSI is not among
    # the SOP classes storescu proposes unless it proposes those of the files only (-R).
    for options, files in [([], ct_files), (["-xy", "-R"], [wsi_file])]:
        sent = subprocess.run(
            [DCMTK_STORESCU, *options, "-aec", "HILUM", "127.0.0.1", str(dimse_server.port),
             *map(str, files)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr

    for study, source_uids, truth, kind in [
        (ct[0].StudyInstanceUID, [ds.SOPInstanceUID for ds in ct], ct_truth, "ct"),
        (wsi.StudyInstanceUID, [wsi.SOPInstanceUID], wsi_truth, "wsi"),
    ]:
        (job,) = wait_for_jobs(worker.queue, study, 1)
        assert job.state == JobState.DONE, job.reason
        # A slice model's job also stores its lesions' outlines, a second SR series.
        expected = sorted(["CT", "SEG", "SR", "SR"] if kind == "ct" else ["SM", "SEG", "SR"])
        assert c_find_modalities(settings, dimse_server.port, study) == expected
        assert qido_modalities(settings, archive, study) == expected
        outputs = [read_stored(archive, study, uid) for uid in job.outputs]
        stored = {ds.SOPClassUID: ds for ds in reversed(outputs)}  # the first of each class
        assert set(stored) == {SEG, SR}
        outlines = [ds.SeriesDescription for ds in outputs if ds.SOPClassUID == SR][1:]
        assert outlines == (
            ["AI outlines ct_lesion_synthetic - not for clinical use"] if kind == "ct" else []
        )

        seg = hd.seg.Segmentation.from_dataset(stored[SEG])
        assert seg.StudyInstanceUID == study and seg.number_of_segments == 1
        if kind == "ct":
            mask = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=source_uids,
                segment_numbers=[1],
                assert_missing_frames_are_empty=True,
            )[..., 0]
        else:
            mask = seg.get_total_pixel_matrix(segment_numbers=[1])[..., 0]
        assert mask.shape == truth.shape
        assert dice(mask > 0, truth) >= 0.9

        sr = hd.sr.Comprehensive3DSR.from_dataset(stored[SR])
        assert sr.StudyInstanceUID == study
        (group,) = sr.content.get_volumetric_roi_measurement_groups()
        assert group.referenced_segment is not None
        assert group.finding_type is not None and group.tracking_uid
