"""Hilum beside Orthanc on the same instances, in the same run: C-FIND, QIDO-RS, STOW-RS,
WADO-RS metadata and WADO-RS frames.

Both servers run on this machine at the same time, each in its own process: Hilum as
``hilum serve`` on its embedded default (SQLite + files; DICOMweb on cheroot),
Orthanc 1.10 with its defaults and the DICOMweb plugin (Debian's ``orthanc`` and
``orthanc-dicomweb``, installed for the benchmarks only; without them the script says so and
stops), started with ``TCP_NODELAY=1`` in its environment so that its DCMTK does not hold each
DIMSE message ~40 ms for a delayed ACK (``benchmarks/orthanc.py``). C-FIND goes through the lean
SCU of ``benchmarks/find_scu.py`` in a process of its own (a plain socket that reads each
response only as far as its Status, so the figures are the SCP's, not a client's decoding), the
same SCU, queries and return keys for both servers; DICOMweb through ``requests`` in this
process.

1. Queries. The same synthetic studies (real DICOM files: tiny 8x8 images, three series per
   study, two instances per series; patient names, dates, accession numbers and modalities drawn
   as in ``benchmarks/synthetic_index.py``) are stored in Hilum through the ingest path and in
   Orthanc through its REST API. For each study-level query of the issues (PatientName prefix
   wild card, PatientID, a one-month StudyDate range, ModalitiesInStudy=CT, AccessionNumber):
   C-FIND (Study Root, STUDY level, the usual return keys, one association per server) and
   QIDO-RS ``/studies``, each after one untimed run, p50 / p95 until the final response / the
   whole body. Match counts are printed for both servers, so a difference in what was matched
   is visible.
2. STOW-RS: a 1 000-instance CT series (64x64) in requests of 50 instances; instances/s.
3. WADO-RS metadata of that series; p50 / p95.
4. WADO-RS frames of a 256-frame JPEG whole-slide image stored with STOW-RS: random frames,
   ``Accept: multipart/related; type="application/octet-stream"; transfer-syntax=*``
   (the stored JPEG bytes); p50 / p95.

A smaller index than ``benchmarks/query.py`` / ``benchmarks/dicomweb.py`` use: Orthanc ingests
through C-STORE/REST only, so 1 M instances would take hours; the ratios are the figures of
interest. Nothing is asserted.

    .venv/bin/python benchmarks/versus_orthanc.py [--studies 2000] [--repeat 20]

Hilum is started with this interpreter (``python -m server.cli serve``) on this checkout's
packages.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import random
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.dicomweb import (  # noqa: E402
    BOUNDARY,
    STOW_BATCH,
    part10,
    percentiles,
    stow_body,
)
from benchmarks.find_scu import find_from_another_process  # noqa: E402
from benchmarks.orthanc import RunningOrthanc, orthanc_installed, running_orthanc  # noqa: E402
from benchmarks.processes import accepts_tcp, free_port, progress, running  # noqa: E402
from benchmarks.synthetic_index import GIVEN, MODALITIES, SURNAMES  # noqa: E402
from config import load_settings  # noqa: E402
from storage.archive import open_archive  # noqa: E402
from storage.ingest import ingest_file  # noqa: E402
from tests.factories import ct_instance  # noqa: E402
from tests.server.dicomweb.test_wsi_frames import jpeg_tile, whole_slide_image  # noqa: E402

RETURN_KEYS = (
    "PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber",
    "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
)  # fmt: skip
FIRST_DAY = datetime.date(2016, 1, 1)
ROOT = "1.2.826.0.1.3680043.10.1337.9"


def synthetic_instances(studies: int, seed: int = 0) -> Iterator[bytes]:
    """Part 10 bytes of ``studies`` studies x 3 series x 2 instances, deterministic."""
    rng = random.Random(seed)
    days = 3652
    patient = name = ""
    for s in range(studies):
        if s % 2 == 0:
            patient = f"PID{s // 2 + 1:07d}"
            name = f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN)}"
        date = FIRST_DAY + datetime.timedelta(days=s * days // studies)
        for series in range(3):
            modality = rng.choice(MODALITIES[:7])  # no SR: every object is an image here
            for n in range(2):
                ds = Dataset()
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.SOPClassUID = CTImageStorage
                ds.SOPInstanceUID = f"{ROOT}.3.{s}.{series}.{n}"
                ds.StudyInstanceUID = f"{ROOT}.1.{s}"
                ds.SeriesInstanceUID = f"{ROOT}.2.{s}.{series}"
                ds.PatientName, ds.PatientID = name, patient
                ds.StudyDate = date.strftime("%Y%m%d")
                ds.StudyTime = "101500"
                ds.AccessionNumber = f"ACC{s + 1:08d}"
                ds.StudyID = str(s + 1)
                ds.Modality = modality
                ds.SeriesNumber, ds.InstanceNumber = series + 1, n + 1
                ds.Rows = ds.Columns = 8
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
                ds.PixelRepresentation = 0
                ds.PixelData = bytes(128)
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                yield buffer.getvalue()


def timed(run: Callable[[], int], repeat: int) -> tuple[float, float, int]:
    run()  # warm the caches once
    samples, matches = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        matches = run()
        samples.append(time.perf_counter() - start)
    p50, p95 = percentiles(samples)
    return p50, p95, matches


def c_find(port: int, ae_title: str, queries: dict[str, dict[str, str]],
           repeat: int) -> dict[str, tuple[float, float, int]]:  # fmt: skip
    """Each query ``repeat`` times after one untimed run, by ``benchmarks/find_scu.py`` in a
    process of its own over one association: query name -> (p50 ms, p95 ms, matches)."""
    requests: list[dict[str, Any]] = [
        {"name": name, "matching": matching, "return_keys": list(RETURN_KEYS),
         "repeat": repeat, "warm_up": True}
        for name, matching in queries.items()
    ]  # fmt: skip
    found = find_from_another_process(port, requests, called_ae=ae_title)
    return {
        run["name"]: (*percentiles([ms / 1000 for ms in run["ms"]]), run["matches"])
        for run in found
    }


def qido(url: str, matching: dict[str, str]) -> Callable[[], int]:
    import json

    query = urllib.parse.urlencode(matching)

    def run() -> int:
        request = urllib.request.Request(
            f"{url}/studies?{query}", headers={"Accept": "application/dicom+json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            body = response.read()
        return len(json.loads(body)) if body else 0

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    if not orthanc_installed(dicomweb=True):
        print("Orthanc: skipped (install Debian's orthanc and orthanc-dicomweb packages)")
        return 0

    work = Path(tempfile.mkdtemp(prefix="hilum-vs-orthanc-"))
    dimse_port, http_port = free_port(), free_port()
    settings = load_settings(None, server={"data_dir": work / "hilum"})
    archive = open_archive(settings, migrate=True)
    with running_orthanc(work / "orthanc", dicomweb=True) as orthanc:
        progress(f"storing {args.studies * 6} instances in Hilum and Orthanc")
        spool = work / "spool.dcm"
        started = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            uploads = []
            for part10 in synthetic_instances(args.studies):
                spool.write_bytes(part10)
                ingest_file(archive, spool)
                uploads.append(pool.submit(orthanc.upload, part10))
            for upload in uploads:
                upload.result()
        archive.close()
        progress(f"stored in {time.perf_counter() - started:.0f} s")
        stored = orthanc.count_instances()
        # Hilum in its own process, like Orthanc: `hilum serve` on the data just stored.
        env = {
            "HILUM_SERVER__DATA_DIR": str(work / "hilum"),
            "HILUM_DIMSE__PORT": str(dimse_port),
            "HILUM_HTTP__PORT": str(http_port),
            "HILUM_INFERENCE__SERVE_WORKER": "false",
            # This checkout's packages, not those an editable install of another one points at.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        command = [sys.executable, "-m", "server.cli", "serve"]
        with running(command, work / "hilum.log", accepts_tcp(http_port), env=env):
            compare(args, orthanc, dimse_port, http_port, stored)
            transactions(args, f"http://127.0.0.1:{http_port}/dicomweb", f"{orthanc.url}/dicom-web")
    return 0


def compare(args: argparse.Namespace, orthanc: RunningOrthanc, dimse_port: int,
            http_port: int, stored: int) -> None:  # fmt: skip
    middle = args.studies // 2
    month = (FIRST_DAY + datetime.timedelta(days=middle * 3652 // args.studies)).strftime("%Y%m")
    queries = {
        "PatientName=SMITH1*": {"PatientName": "SMITH1*"},
        f"PatientID=PID{middle // 2 + 1:07d}": {"PatientID": f"PID{middle // 2 + 1:07d}"},
        f"StudyDate={month}01-{month}31": {"StudyDate": f"{month}01-{month}31"},
        "ModalitiesInStudy=CT": {"ModalitiesInStudy": "CT"},
        f"AccessionNumber=ACC{middle + 1:08d}": {"AccessionNumber": f"ACC{middle + 1:08d}"},
    }
    print(
        f"# {args.studies} studies / {args.studies * 6} instances "
        f"(Orthanc holds {stored}); p50 / p95 in ms; ratio = Orthanc p50 / Hilum p50"
    )
    print("| query | protocol | matches Hilum / Orthanc | Hilum p50 / p95 | "
          "Orthanc p50 / p95 | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    progress("C-FIND, Hilum then Orthanc")
    hilum_find = c_find(dimse_port, "HILUM", queries, args.repeat)
    orthanc_find = c_find(orthanc.dicom_port, orthanc.ae_title, queries, args.repeat)
    for name, matching in queries.items():
        figures = {
            "C-FIND": (hilum_find[name], orthanc_find[name]),
            "QIDO-RS": (
                timed(qido(f"http://127.0.0.1:{http_port}/dicomweb", matching), args.repeat),
                timed(qido(f"{orthanc.url}/dicom-web", matching), args.repeat),
            ),
        }
        for protocol, ((h50, h95, hn), (o50, o95, on)) in figures.items():
            print(
                f"| {name} | {protocol} | {hn} / {on} | {h50:.1f} / {h95:.1f} | "
                f"{o50:.1f} / {o95:.1f} | {o50 / h50:.2f} |",
                flush=True,
            )


def transactions(args: argparse.Namespace, hilum: str, orthanc: str) -> None:
    """STOW-RS, WADO-RS metadata and WADO-RS frames, the same requests to both servers."""
    import requests

    study, series = "1.2.826.0.1.3680043.10.1337.8.1", "1.2.826.0.1.3680043.10.1337.8.2"
    parts = [
        part10(ct_instance(study, series, f"{series}.{n}", seed=n, size=64)) for n in range(1000)
    ]
    slide = whole_slide_image([jpeg_tile(n % 12) for n in range(256)])
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    frame_accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    rng = random.Random(0)
    frames = [rng.randint(1, 256) for _ in range(max(50, args.repeat))]
    print("\n| transaction | Hilum | Orthanc | ratio |\n|---|---|---|---|")
    figures: dict[str, list[str]] = {}
    for name, base in (("Hilum", hilum), ("Orthanc", orthanc)):
        with requests.Session() as session:
            started = time.perf_counter()
            for first in range(0, len(parts), STOW_BATCH):
                body = stow_body(parts[first : first + STOW_BATCH])
                response = session.post(
                    f"{base}/studies", data=body, headers={"Content-Type": content_type}
                )
                response.raise_for_status()
            rate = len(parts) / (time.perf_counter() - started)
            session.post(
                f"{base}/studies", data=stow_body([part10(slide)]),
                headers={"Content-Type": content_type},
            ).raise_for_status()  # fmt: skip

            def get(url: str, accept: str) -> float:
                started = time.perf_counter()
                response = session.get(url, headers={"Accept": accept})  # noqa: B023
                response.raise_for_status()
                return time.perf_counter() - started

            metadata = [
                get(f"{base}/studies/{study}/series/{series}/metadata", "application/dicom+json")
                for _ in range(args.repeat)
            ]
            instance = (
                f"{base}/studies/{slide.StudyInstanceUID}/series/{slide.SeriesInstanceUID}"
                f"/instances/{slide.SOPInstanceUID}"
            )
            frame = [get(f"{instance}/frames/{n}", frame_accept) for n in frames]
        figures[name] = [f"{rate:.0f} inst/s", *(
            "{:.1f} / {:.1f} ms".format(*percentiles(samples)) for samples in (metadata, frame)
        )]  # fmt: skip
    rows = ["STOW-RS, 1 000 CT 64x64, 50 per request", "WADO-RS series metadata, 1 000 "
            "instances, p50 / p95", "WADO-RS frame of a 256-frame JPEG WSI, p50 / p95"]  # fmt: skip
    pairs = zip(rows, figures["Hilum"], figures["Orthanc"], strict=True)
    for row, hilum_figure, orthanc_figure in pairs:
        h, o = float(hilum_figure.split()[0]), float(orthanc_figure.split()[0])
        ratio = h / o if row.startswith("STOW") else o / h
        print(f"| {row} | {hilum_figure} | {orthanc_figure} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
