"""Decoding in a bounded place (issue 17): an instance whose pixel data decodes into more than
one decode may use, stored as an older Hilum (or one with higher ``[limits]``) could have stored
it, retrieved from a real ``hilum serve`` by every path that decodes — rendered, frames in
another syntax, the instance in another syntax, C-GET with transcoding — and read by the AI
worker. Each fails its own request in bounded time, with the limit named; the server's peak
memory stays within a budget; C-ECHO and QIDO-RS are served meanwhile and afterwards; a normal
instance still renders afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from config import Settings
from config.settings import LimitsSettings
from storage.archive import Archive, open_archive
from storage.ingest import ingest_file
from storage.jobs import JobState
from tests import hostile_files
from tests.conftest import free_port
from tests.factories import ct_instance, write_part10
from tests.inference.test_worker import run_until_idle, worker_for

DECODE_MEMORY_MB = 256
# 16-bit RLE images within the default [limits] (a frame < 1 GiB), a few MB stored each:
# - 16000 x 16000 decodes to 488 MiB, over decode_memory_mb as declared: refused before a
#   decoder process sees it;
# - 10000 x 10000 decodes to 191 MiB, within it as declared: every decode of it (the pixels
#   and a copy, a rendering's floating-point values, a transcoded data set) passes it in its
#   decoder process, which is replaced.
OVER_AS_DECLARED, OVER_WHEN_DECODED = 16000, 10000
HOSTILE_SIDE = OVER_WHEN_DECODED
# What the server's peak resident memory (VmHWM) may grow by while the hostile instance is
# retrieved every way at once: its decode alone would take 488 MiB, its rendering gigabytes.
RSS_BUDGET = 128 << 20
ANSWER_WITHIN_S = 60  # each hostile request; C-ECHO and QIDO-RS: 10


@dataclass(frozen=True)
class Server:
    pid: int
    base: str
    dimse_port: int
    ae_title: str
    log: Path


def _env(settings: Settings, http_port: int) -> dict[str, str]:
    s = settings.storage
    return {
        **os.environ,
        "HILUM_SERVER__DATA_DIR": str(settings.server.data_dir),
        "HILUM_DIMSE__PORT": str(settings.dimse.port),
        "HILUM_HTTP__PORT": str(http_port),
        "HILUM_INFERENCE__SERVE_WORKER": "false",
        "HILUM_STORAGE__DATABASE_URL": s.database_url,
        "HILUM_STORAGE__BLOB_URL": s.blob_url,
        "HILUM_STORAGE__S3_ACCESS_KEY": s.s3_access_key,
        "HILUM_STORAGE__S3_SECRET_KEY": s.s3_secret_key,
        "HILUM_LIMITS__DECODE_MEMORY_MB": str(DECODE_MEMORY_MB),
        "HILUM_LIMITS__DECODER_PROCESSES": "2",
    }


@contextlib.contextmanager
def hilum_serve(settings: Settings, tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"],
            env=_env(settings, port),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert process.stdout is not None
        if "Hilum is listening" not in process.stdout.readline():
            process.kill()
            pytest.fail(f"hilum serve did not start: {log.read_text()[-3000:]}")
        yield Server(
            process.pid,
            f"http://127.0.0.1:{port}/dicomweb",
            settings.dimse.port,
            settings.dimse.ae_title,
            log,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _path(ds: Dataset) -> str:
    return (
        f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def _echo(server: Server) -> int:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _qido(server: Server, study: str) -> int:
    response = requests.get(
        f"{server.base}/studies", params={"StudyInstanceUID": study}, timeout=10
    )
    assert response.status_code == 200, response.text
    return len(response.json())


def _c_get_explicit_vr_little_endian(server: Server, ds: Dataset) -> tuple[Dataset, Dataset]:
    """C-GET of the instance by an SCU that accepts CT in Explicit VR Little Endian only: the
    final response's status and identifier."""
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ANSWER_WITHIN_S
    assoc = ae.associate(
        "127.0.0.1",
        server.dimse_port,
        ae_title=server.ae_title,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
    )
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = ds.StudyInstanceUID
    identifier.SeriesInstanceUID = ds.SeriesInstanceUID
    identifier.SOPInstanceUID = ds.SOPInstanceUID
    try:
        *_, (status, found) = assoc.send_c_get(
            identifier, StudyRootQueryRetrieveInformationModelGet
        )
    finally:
        assoc.release()
    return status, found


def test_a_hostile_decode_fails_its_own_request_and_nothing_else(
    settings: Settings, archive: Archive, tmp_path: Path
) -> None:
    hostile = []
    for side in (OVER_AS_DECLARED, OVER_WHEN_DECODED):
        path = hostile_files.rle_zeros(tmp_path / f"{side}.dcm", side, side)
        ingest_file(archive, path)  # within the default [limits], as an older Hilum stored it
        hostile.append(pydicom.dcmread(path, stop_before_pixels=True))
    normal = ct_instance()
    normal.compress(RLELossless, generate_instance_uid=False)  # rendered in a decoder process
    ingest_file(archive, write_part10(normal, tmp_path / "normal.dcm"))

    with hilum_serve(settings, tmp_path) as server:
        # Warm: the HTTP and DIMSE paths, and the decoder processes, once each.
        rendered = requests.get(
            server.base + _path(normal) + "/rendered", headers={"Accept": "image/png"}, timeout=60
        )
        assert rendered.status_code == 200, rendered.text
        assert _echo(server) == 0x0000 and _qido(server, normal.StudyInstanceUID) == 1
        before = peak_rss(server.pid)

        def http(ds: Dataset, suffix: str, accept: str) -> Callable[[], requests.Response]:
            url = server.base + _path(ds) + suffix
            return lambda: requests.get(url, headers={"Accept": accept}, timeout=ANSWER_WITHIN_S)

        hostile_requests: dict[tuple[str, int], Callable[[], object]] = {}
        for ds in hostile:
            hostile_requests |= {
                ("rendered", ds.Rows): http(ds, "/rendered", "image/png"),
                ("thumbnail", ds.Rows): http(ds, "/thumbnail", "image/jpeg"),
                ("frame in another syntax", ds.Rows): http(
                    ds, "/frames/1", 'multipart/related; type="application/octet-stream"'
                ),
                ("instance in another syntax", ds.Rows): http(
                    ds,
                    "",
                    'multipart/related; type="application/dicom"; '
                    f"transfer-syntax={ExplicitVRLittleEndian}",
                ),
                ("C-GET transcoded", ds.Rows): partial(
                    _c_get_explicit_vr_little_endian, server, ds
                ),
            }
        served_meanwhile = 0
        with ThreadPoolExecutor(len(hostile_requests)) as pool:
            started = time.monotonic()
            futures: dict[tuple[str, int], Future[object]] = {
                key: pool.submit(call) for key, call in hostile_requests.items()
            }
            while not all(f.done() for f in futures.values()):
                asked = time.monotonic()
                assert _echo(server) == 0x0000
                assert _qido(server, normal.StudyInstanceUID) == 1
                assert time.monotonic() - asked < 10
                served_meanwhile += 1
            results = {key: f.result() for key, f in futures.items()}
            assert time.monotonic() - started < 2 * ANSWER_WITHIN_S
        assert served_meanwhile >= 1

        for ds in hostile:
            for name in ("rendered", "thumbnail", "frame in another syntax"):
                response = results[name, ds.Rows]
                assert isinstance(response, requests.Response)
                assert response.status_code == 406, (name, response.status_code, response.text)
                reason = response.json()["error"]
                assert ds.SOPInstanceUID in reason, (name, reason)
                assert "limits.decode_memory_mb" in reason, (name, reason)
            response = results["instance in another syntax", ds.Rows]
            assert isinstance(response, requests.Response)
            assert response.status_code == 406, response.text
            assert "limits.decode_memory_mb" in response.json()["error"]
            status, identifier = results["C-GET transcoded", ds.Rows]  # type: ignore[misc]
            assert status.Status == 0xA702  # Unable to perform sub-operations (PS3.4 C.4.3.1.3.1)
            assert status.NumberOfFailedSuboperations == 1
            assert identifier.FailedSOPInstanceUIDList == ds.SOPInstanceUID

        # Served afterwards; the decoders recovered; the server's memory never held the decode.
        assert _echo(server) == 0x0000
        assert _qido(server, normal.StudyInstanceUID) == 1
        for _ in range(2):  # both decoder processes, whichever were replaced
            again = requests.get(
                server.base + _path(normal) + "/rendered",
                headers={"Accept": "image/png"},
                timeout=60,
            )
            assert again.status_code == 200 and again.content == rendered.content
        grown = peak_rss(server.pid) - before
        assert grown < RSS_BUDGET, f"the server's peak RSS grew by {grown >> 20} MiB"
    sub_operations = [
        line for line in server.log.read_text().splitlines() if "sub-operation" in line
    ]
    for ds in hostile:
        assert any(
            ds.SOPInstanceUID in line and "limits.decode_memory_mb" in line
            for line in sub_operations
        ), sub_operations


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_the_ai_worker_fails_the_job_of_a_hostile_decode(
    backend: str, settings: Settings, tmp_path: Path
) -> None:
    limits = LimitsSettings(decode_memory_mb=DECODE_MEMORY_MB)
    archive = open_archive(settings.model_copy(update={"limits": limits}), migrate=True)
    try:
        # A CT of the abdomen: the CT reference model's input (its manifest's applies_to).
        path = hostile_files.rle_zeros(
            tmp_path / "h.dcm", HOSTILE_SIDE, HOSTILE_SIDE, BodyPartExamined="ABDOMEN"
        )
        ingest_file(archive, path)
        worker = worker_for(settings, archive)
        before = peak_rss(os.getpid())
        started = time.monotonic()
        (job,) = run_until_idle(worker)
        assert time.monotonic() - started < ANSWER_WITHIN_S
        assert (job.state, job.attempts) == (JobState.FAILED, 1)  # the input: not retried
        assert "limits.decode_memory_mb" in job.reason, job.reason
        assert peak_rss(os.getpid()) - before < RSS_BUDGET
    finally:
        archive.close()
