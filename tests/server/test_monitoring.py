"""/healthz, /readyz and /metrics against real servers: the Flask app on cheroot, `hilum web`
under gunicorn (multiprocess metrics), `hilum dimse` with its metrics port, the AI worker."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from prometheus_client.parser import text_string_to_metric_families

from config import Settings
from inference.phantoms import synthetic_ct_series
from server.app import HttpServer, create_app
from server.metrics import GpuMemory, GpuMemoryReading, Metrics, MetricsServer, read_cuda_memory
from storage.archive import Archive, open_archive
from tests.conftest import S3Server, free_port, make_settings, s3_blob_url
from tests.factories import DCMTK_STORESCU, ct_instance, write_part10
from tests.hilum_process import stop_hilum
from tests.inference.test_worker import run_until_idle, store_series, worker_for
from tests.server.dicomweb.conftest import ct_series
from tests.server.test_cli import hilum_env
from tests.tcp_proxy import TcpProxy


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` whose labels include ``labels``; 0 when absent (a
    labelled counter appears with its first increment)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                return s.value
    return 0.0


@pytest.fixture
def served(settings: Settings, archive: Archive) -> Iterator[str]:
    server = HttpServer(create_app(settings, archive), "127.0.0.1", free_port())
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def test_liveness_readiness_and_metrics_count_stow_and_qido(served: str) -> None:
    assert requests.get(f"{served}/healthz", timeout=10).json() == {"status": "alive"}
    ready = requests.get(f"{served}/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "index": "ok", "blobs": "ok"}

    client = DICOMwebClient(f"{served}/dicomweb")
    instances = ct_series(3)
    client.store_instances(instances)
    client.store_instances(instances)  # the same again: duplicates
    client.search_for_studies(search_filters={"StudyInstanceUID": instances[0].StudyInstanceUID})

    response = requests.get(f"{served}/metrics", timeout=10)
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    text = response.text
    received = "hilum_instances_received_total"
    assert sample(text, received, transport="stow-rs", outcome="stored") == 3
    assert sample(text, received, transport="stow-rs", outcome="duplicate") == 3
    assert sample(text, "hilum_bytes_received_total", transport="stow-rs") > 6 * 1000
    assert sample(text, "hilum_http_requests_total", service="stow-rs", status="200") == 2
    assert sample(text, "hilum_http_requests_total", service="qido-rs", status="200") == 1
    assert sample(text, "hilum_http_request_seconds_count", service="stow-rs") == 2
    assert sample(text, "hilum_http_request_seconds_bucket", service="qido-rs", le="+Inf") == 1
    assert sample(text, "hilum_query_seconds_count", service="qido-rs") == 1
    assert 'hilum_query_seconds_count{service="stow-rs"}' not in text
    assert 'hilum_jobs{state="queued"} 0.0' in text  # read from the index at the scrape
    # Monitoring requests are not DICOMweb requests.
    assert 'service="healthz"' not in text


@pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)
def test_readiness_names_the_blob_directory_that_is_gone(
    settings: Settings, served: str, caplog: pytest.LogCaptureFixture
) -> None:
    blobs = settings.server.data_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    moved = settings.server.data_dir / "blobs-away"
    shutil.move(blobs, moved)  # the disk holding the blobs is unmounted
    gone = requests.get(f"{served}/readyz", timeout=10)
    assert gone.status_code == 503
    assert gone.json() == {"status": "not ready", "index": "ok", "blobs": "unavailable"}
    # The reason is logged, not told to whoever reaches the port.
    assert f"not ready: blobs: blob directory {blobs.resolve()} is missing" in caplog.text
    assert str(blobs) not in gone.text
    assert requests.get(f"{served}/healthz", timeout=10).status_code == 200  # still alive

    shutil.move(moved, blobs)
    assert requests.get(f"{served}/readyz", timeout=10).status_code == 200


def test_readiness_turns_503_while_s3_or_the_database_is_unreachable(
    tmp_path: Path, postgres_url: str, s3_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    s3_proxy, db_proxy = TcpProxy(s3_server.port), TcpProxy(5432)
    settings = make_settings(
        tmp_path,
        database_url=postgres_url.replace(":5432/", f":{db_proxy.port}/"),
        blob_url=s3_blob_url(f"http://127.0.0.1:{s3_proxy.port}"),
    )
    archive = open_archive(settings, migrate=True)
    server = HttpServer(create_app(settings, archive), "127.0.0.1", free_port())
    server.start()
    readyz = f"http://127.0.0.1:{server.port}/readyz"
    try:
        assert requests.get(readyz, timeout=30).status_code == 200
        s3_proxy.cut()
        down = requests.get(readyz, timeout=30)
        assert down.status_code == 503
        assert down.json() == {"status": "not ready", "index": "ok", "blobs": "unavailable"}
        assert "not ready: blobs: S3 store unreachable" in caplog.text
        s3_proxy.restore()
        assert requests.get(readyz, timeout=30).status_code == 200

        db_proxy.cut()
        down = requests.get(readyz, timeout=30)
        assert down.status_code == 503
        assert down.json() == {"status": "not ready", "index": "unavailable", "blobs": "ok"}
        assert "not ready: index: index database" in caplog.text
        db_proxy.restore()
        assert requests.get(readyz, timeout=30).status_code == 200
    finally:
        server.stop()
        archive.close()
        s3_proxy.close()
        db_proxy.close()


def _listening_sockets(port: int) -> int:
    """How many sockets listen on ``port`` (SO_REUSEPORT: one per receiving process)."""
    listening = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            listening += fields[3] == "0A" and local_port == port  # 0A: LISTEN
    return listening


def _started(command: str, env: dict[str, str]) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", command], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    banner = process.stdout.readline()
    if "listening" not in banner:
        process.kill()
        pytest.fail(f"hilum {command} did not start: {process.communicate()[1][-3000:]}")
    return process


def _stop(process: subprocess.Popen) -> None:
    stop_hilum(process)
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""


@pytest.mark.parametrize("backend", ["postgresql-s3"], indirect=True)
def test_hilum_web_adds_up_the_metrics_of_its_gunicorn_workers(
    settings: Settings, archive: Archive
) -> None:
    env = hilum_env(settings, HILUM_HTTP__WORKERS="2", HILUM_HTTP__THREADS="2")
    process = _started("web", env)
    base = f"http://127.0.0.1:{settings.http.port}"
    try:
        # One request per connection: gunicorn's workers share the listening socket, so the
        # requests are spread over both; /metrics answers for all of them whichever answers.
        for _ in range(6):
            client = DICOMwebClient(f"{base}/dicomweb")
            client.store_instances(ct_series(1))
        for _ in range(3):
            text = requests.get(f"{base}/metrics", headers={"Connection": "close"}, timeout=30).text
            received = sample(
                text, "hilum_instances_received_total", transport="stow-rs", outcome="stored"
            )
            assert received == 6
            assert sample(text, "hilum_http_requests_total", service="stow-rs", status="200") == 6
        assert requests.get(f"{base}/readyz", timeout=30).status_code == 200
    finally:
        _stop(process)
    # The files of the multiprocess mode live under the data directory, not in /tmp.
    assert list((settings.server.data_dir / "metrics" / "web").glob("counter_*.db"))


@pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)
@pytest.mark.parametrize("processes", [1, 2])
def test_hilum_dimse_serves_its_counters_on_the_metrics_port(
    settings: Settings, archive: Archive, tmp_path: Path, processes: int
) -> None:
    """With ``[dimse] processes = 2`` the receiving process's counts are added up with the
    parent's: the total is right whichever process each association reached."""
    metrics_port = free_port()
    env = hilum_env(settings, HILUM_METRICS__PORT=str(metrics_port),
               HILUM_DIMSE__PROCESSES=str(processes))  # fmt: skip
    process = _started("dimse", env)
    try:
        deadline = time.monotonic() + 60
        while _listening_sockets(settings.dimse.port) < processes:  # the receiver is up
            assert time.monotonic() < deadline, "the receiving process did not listen"
            time.sleep(0.1)
        study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
        count = 16  # one association each: the kernel spreads them over both processes
        files = [
            str(write_part10(ct_instance(study, series, seed=i), tmp_path / f"{i}.dcm"))
            for i in range(count)
        ]
        port = str(settings.dimse.port)
        senders = [
            subprocess.Popen(
                [DCMTK_STORESCU, "-aec", "HILUM", "127.0.0.1", port, file],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for file in files
        ]
        assert [sender.wait(60) for sender in senders] == [0] * count
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        received = "hilum_instances_received_total"
        assert sample(text, received, transport="dimse", outcome="stored") == count
        assert sample(text, "hilum_bytes_received_total", transport="dimse") > count * 1000
    finally:
        _stop(process)


def test_worker_metrics_time_a_job_from_queued_to_done(
    settings: Settings, archive: Archive, tmp_path: Path
) -> None:
    datasets, _mask = synthetic_ct_series(1)
    store_series(archive, tmp_path / "ct", datasets)
    metrics = Metrics()
    worker = worker_for(settings, archive)
    worker.on_job_ended = metrics.job_observer()

    (job,) = run_until_idle(worker)

    text = metrics.exposition(archive)[0].decode()
    model = job.model_name
    assert sample(text, "hilum_jobs_finished_total", model=model, state="done") == 1
    assert sample(text, "hilum_job_seconds_count", model=model) == 1
    assert sample(text, "hilum_inference_seconds_count", model=model) == 1
    assert sample(text, "hilum_job_seconds_sum", model=model) > 0
    assert sample(text, "hilum_inference_seconds_sum", model=model) > 0
    assert sample(text, "hilum_jobs", state="done") == 1
    assert sample(text, "hilum_jobs", state="queued") == 0
    # The worker's results went through ingest with no transport counter: not "received".
    assert sample(text, "hilum_instances_received_total") == 0


def test_gpu_memory_is_served_for_each_device_read_and_absent_when_none_is() -> None:
    """The gauges as a scrape of a real metrics server sees them, from a reading given to the
    collector (no GPU on the test machines: what torch.cuda would report, stated)."""
    readings: list[GpuMemoryReading] = [GpuMemoryReading("cuda:1", 10, 20, 300, 4000)]
    metrics = Metrics()
    metrics.collectors.append(GpuMemory(lambda: readings))
    metrics.jobs_finished.labels("ct-lesions", "done").inc()
    port = free_port()
    server = MetricsServer(metrics, "127.0.0.1", port)
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        values = {
            field: sample(text, f"hilum_gpu_memory_{field}_bytes", device="cuda:1")
            for field in ("allocated", "reserved", "used", "total")
        }
        assert values == {"allocated": 10, "reserved": 20, "used": 300, "total": 4000}
        readings.clear()  # the worker runs on the CPU
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "hilum_gpu_memory" not in text
        assert sample(text, "hilum_jobs_finished_total", model="ct-lesions", state="done") == 1
    finally:
        server.stop()


def test_gpu_memory_of_a_cpu_device_is_none() -> None:
    import torch

    assert read_cuda_memory("cpu") == []
    readings = read_cuda_memory("cuda")
    if torch.cuda.is_available():  # a machine with a GPU: what the device says
        (reading,) = readings
        assert reading.device == f"cuda:{torch.cuda.current_device()}"
        assert 0 <= reading.allocated <= reading.reserved <= reading.used <= reading.total
    else:
        assert readings == []
