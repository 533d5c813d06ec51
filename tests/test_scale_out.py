"""The docker-compose topology, started natively (no Docker engine on these machines): one
PostgreSQL, one S3 server (SeaweedFS), `hilum db upgrade`, two `hilum dimse`, `hilum web` under
gunicorn with two workers, two `hilum worker`. Three studies go through both DIMSE processes at
once; every instance is indexed once, every job runs once, each study gets one SEG and one SR."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from dicomweb_client.api import DICOMwebClient
from prometheus_client.parser import text_string_to_metric_families

from inference.phantoms import synthetic_ct_series
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY, SeaweedFS, free_port, s3_blob_url
from tests.factories import DCMTK_STORESCU, write_part10
from tests.waiting import wait_until

SEG, SR, CT = "SEG", "SR", "CT"
STUDIES = 3


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


class Topology:
    def __init__(self, tmp_path: Path, database_url: str, blob_url: str) -> None:
        self.tmp_path = tmp_path
        self.common = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("HILUM_", "PROMETHEUS"))},
            "HILUM_STORAGE__DATABASE_URL": database_url,
            "HILUM_STORAGE__BLOB_URL": blob_url,
            "HILUM_STORAGE__S3_ACCESS_KEY": S3_ACCESS_KEY,
            "HILUM_STORAGE__S3_SECRET_KEY": S3_SECRET_KEY,
            "HILUM_INFERENCE__STABLE_AFTER_S": "2",
            "HILUM_INFERENCE__POLL_INTERVAL_S": "0.3",
            # JSON logs: each line parsed, and its request, association or job id checked.
            "HILUM_LOG__FORMAT": "json",
        }
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.commands: list[str] = []

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "server.cli", *args], env={**self.common, **env},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    def start(self, name: str, command: str, **env: str) -> str:
        """Start ``hilum command`` and wait for its banner (returned). Its output goes to
        files, never to a pipe that nobody reads (a full pipe would stop the process)."""
        data_dir = self.tmp_path / name  # each process its own temporary files
        data_dir.mkdir()
        out, err = data_dir / "stdout.log", data_dir / "stderr.log"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", command],
                env={**self.common, "HILUM_SERVER__DATA_DIR": str(data_dir), **env},
                stdout=stdout, stderr=stderr, text=True,
            )  # fmt: skip
        self.processes.append(process)
        self.logs.append(err)
        self.commands.append(command)

        def started() -> bool:
            if process.poll() is not None:
                pytest.fail(f"hilum {command} ({name}) exited: {err.read_text()[-3000:]}")
            return out.read_text().startswith(("Hilum is listening", "Hilum worker"))

        wait_until(started, f"hilum {command} ({name}) to start", timeout_s=120)
        return out.read_text().splitlines()[0]

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.mark.slow
def test_two_dimse_two_workers_and_gunicorn_on_one_postgresql_and_s3(
    tmp_path: Path, postgres_url: str
) -> None:
    # An S3 server of this test's own, which it stops and starts again.
    (tmp_path / "s3").mkdir()
    s3 = SeaweedFS(tmp_path / "s3")
    bucket_url = s3_blob_url(s3.start())
    topology = Topology(tmp_path, postgres_url, bucket_url)
    migrated = topology.run("db", "upgrade")
    assert migrated.returncode == 0, migrated.stderr

    dimse_ports = [free_port(), free_port()]
    worker_metrics = [free_port(), free_port()]
    dimse_metrics = [free_port(), free_port()]
    http_port = free_port()
    try:
        worker_names = []
        for n in range(2):
            topology.start(f"dimse{n}", "dimse", HILUM_DIMSE__PORT=str(dimse_ports[n]),
                           HILUM_METRICS__PORT=str(dimse_metrics[n]))  # fmt: skip
            banner = topology.start(
                f"worker{n}", "worker", HILUM_METRICS__PORT=str(worker_metrics[n])
            )
            worker_names.append(banner.split()[2])  # "Hilum worker NAME is running ..."
        topology.start("web", "web", HILUM_HTTP__PORT=str(http_port), HILUM_HTTP__WORKERS="2",
                       HILUM_HTTP__THREADS="2")  # fmt: skip
        base = f"http://127.0.0.1:{http_port}"

        # Three studies; every file goes to both DIMSE processes at the same time (a modality
        # that retries through another node of the load balancer): each is indexed once.
        studies: dict[str, int] = {}
        folders = []
        for seed in range(STUDIES):
            datasets, _mask = synthetic_ct_series(7000 + seed, slices=8)
            studies[datasets[0].StudyInstanceUID] = len(datasets)
            folder = tmp_path / f"study{seed}"
            folder.mkdir()
            for ds in datasets:
                write_part10(ds, folder / f"{ds.SOPInstanceUID}.dcm")
            folders.append(folder)
        files = [str(path) for folder in folders for path in sorted(folder.iterdir())]

        def send(port: int) -> subprocess.CompletedProcess:
            return subprocess.run(
                [DCMTK_STORESCU, "-aec", "HILUM", "127.0.0.1", str(port), *files],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip

        with ThreadPoolExecutor(2) as pool:
            for sent in pool.map(send, dimse_ports):
                assert sent.returncode == 0, sent.stderr

        client = DICOMwebClient(f"{base}/dicomweb")
        qido_requests = 0

        def modalities(study: str) -> list[str]:
            nonlocal qido_requests
            qido_requests += 1
            series = client.search_for_series(study, fields=["Modality"])
            return sorted(s["00080060"]["Value"][0] for s in series)

        for study in studies:
            wait_until(
                lambda study=study: modalities(study) == [CT, SEG, SR, SR],
                f"AI on {study}",
                400,
                0.5,
            )

        # QIDO-RS through gunicorn: every CT instance once, plus one SEG, one SR and the SR of
        # the lesions' outlines.
        for study, count in studies.items():
            instances = client.search_for_instances(study)
            qido_requests += 1
            uids = [i["00080018"]["Value"][0] for i in instances]
            assert len(uids) == len(set(uids)) == count + 3
        # Each job ran once: one attempt, done, by one of the two workers (the JSON API,
        # through gunicorn).
        jobs = [
            job
            for study in studies
            for job in requests.get(f"{base}/api/studies/{study}/jobs", timeout=30).json()
        ]
        assert len(jobs) == STUDIES
        assert all(job["state"] == "done" and job["attempts"] == 1 for job in jobs), jobs
        assert {job["worker"] for job in jobs} <= set(worker_names)

        # The metrics of the two DIMSE processes: every file received twice, stored once.
        sent_files = len(files)
        dimse = [requests.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text
                 for p in dimse_metrics]  # fmt: skip
        received = "hilum_instances_received_total"
        stored = sum(total(t, received, transport="dimse", outcome="stored") for t in dimse)
        duplicates = sum(total(t, received, transport="dimse", outcome="duplicate") for t in dimse)
        assert (stored, duplicates) == (sent_files, sent_files)
        workers = [requests.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text
                   for p in worker_metrics]  # fmt: skip
        assert sum(total(t, "hilum_jobs_finished_total", state="done") for t in workers) == 3
        assert total(workers[0], "hilum_jobs", state="done") == STUDIES  # from the index
        # GPU memory: on a worker with a GPU, absent on the CPU.
        gpu = total(workers[0], "hilum_gpu_memory_total_bytes")
        assert gpu > 0 if torch.cuda.is_available() else "hilum_gpu_memory" not in workers[0]
        web = requests.get(f"{base}/metrics", timeout=10).text
        # Every QIDO-RS request of this test, counted by whichever gunicorn worker served it.
        assert total(web, "hilum_http_requests_total", service="qido-rs") == qido_requests
        assert total(web, "hilum_http_requests_total", service="qido-rs", status="200") == (
            qido_requests
        )

        # Readiness follows the object store: the S3 server stopped, then started again.
        probe = {"X-Request-Id": "scale-out-probe"}
        assert requests.get(f"{base}/readyz", headers=probe, timeout=30).status_code == 200
        s3.stop()
        down = requests.get(f"{base}/readyz", timeout=30)
        assert down.status_code == 503 and down.json()["index"] == "ok", down.text
        s3.start()
        assert requests.get(f"{base}/readyz", timeout=30).status_code == 200
    finally:
        topology.stop()
        s3.stop()
    for process, log in zip(topology.processes, topology.logs, strict=True):
        assert process.returncode == 0, log.read_text()[-3000:]
    check_json_logs(topology, {job["id"] for job in jobs})


def check_json_logs(topology: Topology, job_ids: set[int]) -> None:
    """Every line each process wrote to stderr is one JSON object of its command; the lines
    about an association, an HTTP request (gunicorn's access log included) or an AI job name
    it."""
    lines: dict[str, list[dict]] = {"dimse": [], "web": [], "worker": []}
    for command, log in zip(topology.commands, topology.logs, strict=True):
        for text in log.read_text().splitlines():
            line = json.loads(text)
            assert line["command"] == command, line
            lines[command].append(line)
    # DIMSE: each storescu association's summary, by the association it is about.
    summaries = [line for line in lines["dimse"] if "association STORESCU ->" in line["message"]]
    assert len(summaries) == 2  # one per DIMSE process
    for line in lines["dimse"]:
        named = re.match(r"\[(A\d+)\] ", line["message"])
        if named:
            assert line.get("association") == named.group(1) and "peer" in line, line
    # gunicorn: its access line of each request with the request's id.
    access = [line for line in lines["web"] if line["logger"] == "gunicorn.access"]
    assert access and all(re.fullmatch(r"[\w.:@/+=-]{1,64}", line["request_id"]) for line in access)
    assert any(
        "/readyz" in line["message"] and line["request_id"] == "scale-out-probe" for line in access
    )
    assert any("Booting worker" in line["message"] for line in lines["web"])  # gunicorn's own
    # Workers: every line names the worker; a job's lines its job.
    assert all(
        "worker" in line for line in lines["worker"] if line["logger"].startswith("inference")
    )
    done = set()
    for line in lines["worker"]:
        about = re.match(r"job (\d+): ", line["message"])
        if about:
            assert line.get("job_id") == int(about.group(1)), line
            done.add(line["job_id"])
    assert done == job_ids
