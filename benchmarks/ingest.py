"""C-STORE ingest throughput: Hilum against a bare pynetdicom SCP and Orthanc.

What is measured: the wall-clock time DCMTK's ``storescu`` takes to send one synthetic CT
series (512x512, 16-bit allocated / 12 stored, explicit VR little endian, 300 instances by
default) to a target over 1 association (one storescu process with every file) and over 4
associations (4 storescu processes in parallel, each with a quarter of the files). The time
runs from starting storescu to the exit of the last one, so it includes storescu's own start
and file reading (the same for every target; the files are in the page cache).

Targets, each started fresh for every measurement on free loopback ports, and stopped after:

* ``hilum serve``, embedded default (SQLite index + files under a temporary data dir);
* ``hilum serve`` on PostgreSQL (a fresh ``hilum_bench_*`` database on 127.0.0.1:5432) and
  S3 (a SeaweedFS ``weed mini`` server, one per run of this script, a fresh bucket per
  measurement);
* ``benchmarks/bare_scp.py``: pynetdicom writing each data set to a file, nothing else (with
  Hilum's default Maximum Length Received, so that both receive the same PDUs);
* Orthanc, with its defaults (SQLite, fsync), when Debian's ``orthanc`` package is installed.

Reported: instances/s and MB/s (MB = 10^6 bytes of the Part 10 files sent) and "lost": the
instances sent minus the instances the target holds afterwards (Hilum's index, the bare SCP's
files, Orthanc's statistics). Figures go to stdout, progress to stderr; nothing is asserted.

    .venv/bin/python benchmarks/ingest.py [--instances N]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.orthanc import orthanc_installed, running_orthanc  # noqa: E402
from benchmarks.processes import (  # noqa: E402
    accepts_tcp,
    answers_http,
    free_port,
    printed,
    progress,
    running,
    start_process,
    stop_process,
)
from config.settings import DimseSettings  # noqa: E402

VENV_BIN = REPO / ".venv" / "bin"
HILUM = VENV_BIN / "hilum"
WEED = VENV_BIN / "weed"
BARE_SCP = REPO / "benchmarks" / "bare_scp.py"
# DCMTK's storescu; .venv/bin/storescu is pynetdicom's script of the same name.
STORESCU = "/usr/bin/storescu"
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
S3_ACCESS_KEY, S3_SECRET_KEY = "hilum", "hilumsecret"
ASSOCIATIONS = (1, 4)
# Hilum's warnings and errors, tracebacks, and Orthanc's errors ("E0123 12:00:00.000 ...").
PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback|^E\d{4} ")
SEND_TIMEOUT_S = 1800

EMBEDDED = "hilum (sqlite+files)"
POSTGRES_S3 = "hilum (postgres+s3)"
BARE = "bare pynetdicom SCP"
ORTHANC = "orthanc"


@dataclass
class Target:
    """A listening C-STORE SCP: where to send, and how many instances it holds."""

    name: str
    ae_title: str
    port: int
    count_stored: Callable[[], int]
    logs: list[Path] = field(default_factory=list)


@dataclass
class Result:
    target: str
    associations: int
    instances: int
    nbytes: int
    seconds: float
    stored: int | None
    failures: list[str]

    @property
    def lost(self) -> int | None:
        return None if self.stored is None else self.instances - self.stored


# --- the synthetic series -------------------------------------------------------------------


def phantom(size: int) -> np.ndarray:
    """A water ellipse with a bone ring and two soft-tissue blobs, as stored values (HU+1024)."""
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    image = np.full((size, size), 24.0)  # air, -1000 HU
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2
    image[body <= 1.0] = 1064.0  # soft tissue, 40 HU
    image[(body > 0.88) & (body <= 1.0)] = 1924.0  # bone, 900 HU
    image[(x - 0.3) ** 2 + y**2 < 0.02] = 1084.0
    image[(x + 0.35) ** 2 + (y - 0.1) ** 2 < 0.03] = 994.0
    return image


def ct_slice(
    base: np.ndarray, rng: np.random.Generator, uids: dict[str, str], number: int
) -> FileDataset:
    sop_instance_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)

    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.PatientName = "BENCH^INGEST"
    ds.PatientID = "BENCH-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uids["study"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "BENCH1"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = "Ingest benchmark"
    ds.Modality = "CT"
    ds.Manufacturer = "Hilum benchmark"
    ds.SeriesInstanceUID = uids["series"]
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Synthetic phantom"
    ds.BodyPartExamined = "CHEST"
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = number
    ds.AcquisitionNumber = 1
    ds.ImagePositionPatient = [-250.0, -250.0, -1.0 * number]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 1.0
    ds.SliceLocation = -1.0 * number
    ds.PixelSpacing = [0.9765625, 0.9765625]
    ds.KVP = 120
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400

    rows, columns = base.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    noisy = base + rng.normal(0.0, 20.0, base.shape)
    ds.PixelData = np.clip(noisy, 0, 4095).astype("<u2").tobytes()
    return ds


def write_series(directory: Path, count: int, seed: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = phantom(512)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    paths = []
    for number in range(1, count + 1):
        path = directory / f"ct{number:05d}.dcm"
        ct_slice(base, rng, uids, number).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --- targets --------------------------------------------------------------------------------


def count_sqlite(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM instance").fetchone()[0])


def count_postgres(database: str) -> int:
    with psycopg.connect(f"{POSTGRES}/{database}") as db:
        row = db.execute("SELECT count(*) FROM instance").fetchone()
    return int(row[0]) if row else 0


@contextlib.contextmanager
def hilum(
    workdir: Path, name: str, env: dict[str, str], count: Callable[[], int]
) -> Iterator[Target]:
    port = free_port()
    log = workdir / "hilum.log"
    env = {"HILUM_SERVER__DATA_DIR": str(workdir / "data"), "HILUM_DIMSE__PORT": str(port), **env}
    # Measured once all of it runs: while the AI worker imports torch and loads its models,
    # the DIMSE port already accepts, at a fraction of the steady rate.
    with running([HILUM, "serve"], log, printed(log, "Hilum is listening"), env):
        yield Target(name, "HILUM", port, count, [log])


@contextlib.contextmanager
def hilum_embedded(workdir: Path) -> Iterator[Target]:
    with hilum(workdir, EMBEDDED, {}, lambda: count_sqlite(workdir / "data" / "index.sqlite")) as t:
        yield t


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    name = f"hilum_bench_{random.randrange(16**8):08x}"
    with psycopg.connect(f"{POSTGRES}/test", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(f"{POSTGRES}/test", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def seaweedfs(workdir: Path) -> Iterator[int]:
    """A SeaweedFS ``weed mini`` S3 server; yields its S3 port. Its gRPC ports are port+10000."""
    ports = [free_port(also_free_at=10000) for _ in range(5)]
    s3, master, filer, volume, admin = ports
    (workdir / "weed").mkdir()
    command = [
        WEED, "mini", f"-dir={workdir / 'weed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={s3}", f"-master.port={master}", f"-filer.port={filer}",
        f"-volume.port={volume}", f"-admin.port={admin}", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    env = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    log = workdir / "weed.log"
    with running(command, log, answers_http(f"http://127.0.0.1:{s3}/"), env, timeout_s=60):
        yield s3


def hilum_postgres_s3(s3_port: int) -> Callable[[Path], contextlib.AbstractContextManager[Target]]:
    @contextlib.contextmanager
    def start(workdir: Path) -> Iterator[Target]:
        with postgres_database() as database:
            env = {
                "HILUM_STORAGE__DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
                "HILUM_STORAGE__BLOB_URL": f"s3://{database.replace('_', '-')}"
                f"?endpoint=http://127.0.0.1:{s3_port}",
                "HILUM_STORAGE__S3_ACCESS_KEY": S3_ACCESS_KEY,
                "HILUM_STORAGE__S3_SECRET_KEY": S3_SECRET_KEY,
            }
            with hilum(workdir, POSTGRES_S3, env, lambda: count_postgres(database)) as target:
                yield target

    return start


@contextlib.contextmanager
def bare_scp(workdir: Path) -> Iterator[Target]:
    port = free_port()
    out = workdir / "received"
    # The same Maximum Length Received as Hilum's default: the ceiling receives as Hilum does.
    max_pdu = DimseSettings().max_pdu_length
    command = [sys.executable, BARE_SCP, "--port", str(port), "--out", out, "--max-pdu", max_pdu]
    log = workdir / "bare_scp.log"
    with running(command, log, accepts_tcp(port)):
        yield Target(BARE, "BARESCP", port, lambda: len(list(out.glob("*.dcm"))), [log])


@contextlib.contextmanager
def orthanc(workdir: Path) -> Iterator[Target]:
    with running_orthanc(workdir) as peer:
        yield Target(ORTHANC, peer.ae_title, peer.dicom_port, peer.count_instances, [peer.log])


# --- sending --------------------------------------------------------------------------------


def send(
    files: list[Path], target: Target, associations: int, workdir: Path
) -> tuple[float, list[str]]:
    """Send ``files`` with ``associations`` parallel storescu processes; (seconds, failures)."""
    chunks = [files[i::associations] for i in range(associations)]
    logs = [workdir / f"storescu-{i}.log" for i in range(associations)]
    base = [
        STORESCU,
        "-nh",
        "-aet",
        "BENCH",
        "-aec",
        target.ae_title,
        "127.0.0.1",
        str(target.port),
    ]
    started = time.perf_counter()
    processes = [start_process(base + chunk, log) for chunk, log in zip(chunks, logs, strict=True)]
    failures: list[str] = []
    for process, log in zip(processes, logs, strict=True):
        try:
            process.wait(timeout=SEND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_process(process, grace_s=1)
            failures.append(f"{log.name}: killed after {SEND_TIMEOUT_S} s")
    seconds = time.perf_counter() - started
    for process, log in zip(processes, logs, strict=True):
        # storescu logs failed stores and association problems at level E (or F).
        errors = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if line[:2] in ("E:", "F:")
        ]
        if process.returncode != 0 or errors:
            failures.append(f"{log.name}: exit {process.returncode}, {len(errors)} error line(s)")
            failures.extend(f"  {line}" for line in errors[:5])
    return seconds, failures


def log_problems(log: Path, limit: int = 8) -> list[str]:
    """Warning, error and traceback lines of a server log."""
    if not log.exists():
        return []
    lines = log.read_text(errors="replace").splitlines()
    found = [line for line in lines if PROBLEM.search(line)]
    if len(found) > limit:
        found = found[:limit] + [f"... and {len(found) - limit} more"]
    return found


def measure(
    name: str,
    start: Callable[[Path], contextlib.AbstractContextManager[Target]],
    files: list[Path],
    associations: int,
    root: Path,
    notes: list[str],
) -> Result | None:
    """One measurement on a freshly started target; None (and a note) if it cannot start."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{name.split()[0]}-{associations}-", dir=root))
    nbytes = sum(path.stat().st_size for path in files)
    progress(f"{name}, {associations} association(s): starting")
    stored: int | None = None
    logs: list[Path] = []
    try:
        with start(workdir) as target:
            logs = target.logs
            progress(f"{name}: listening on {target.port}; sending {len(files)} instances")
            seconds, failures = send(files, target, associations, workdir)
            try:
                stored = target.count_stored()
            except Exception as error:  # noqa: BLE001 - reported, not raised
                failures.append(f"cannot count stored instances: {error}")
    except (RuntimeError, OSError, psycopg.Error) as error:
        progress(f"{name}, {associations} association(s) skipped: {error}")
        notes.append(f"{name}, {associations} assoc: skipped, {str(error).splitlines()[0]}")
        return None
    finally:
        for log in logs:
            for line in log_problems(log):
                notes.append(f"{name}, {associations} assoc, {log.name}: {line}")
        shutil.rmtree(workdir, ignore_errors=True)
    result = Result(name, associations, len(files), nbytes, seconds, stored, failures)
    progress(f"{name}, {associations} association(s): {seconds:.2f} s, lost {result.lost}")
    notes.extend(f"{name}, {associations} assoc: {line}" for line in failures)
    return result


# --- report ---------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    header = (
        f"{'target':<22} {'assocs':>6} {'instances':>9} {'seconds':>8} {'inst/s':>8} "
        f"{'MB/s':>7} {'lost':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        lost = "?" if r.lost is None else str(r.lost)
        print(
            f"{r.target:<22} {r.associations:>6} {r.instances:>9} {r.seconds:>8.2f} "
            f"{r.instances / r.seconds:>8.1f} {r.nbytes / 1e6 / r.seconds:>7.1f} {lost:>5}"
        )


def print_ratios(results: list[Result]) -> None:
    rate = {(r.target, r.associations): r.instances / r.seconds for r in results}
    pairs = [(EMBEDDED, BARE), (EMBEDDED, ORTHANC), (POSTGRES_S3, EMBEDDED)]
    print()
    print("ratios of instances/s:")
    for numerator, denominator in pairs:
        for n in ASSOCIATIONS:
            if (numerator, n) in rate and (denominator, n) in rate:
                ratio = rate[(numerator, n)] / rate[(denominator, n)]
                print(f"  {numerator} / {denominator}, {n} assoc: {ratio:.2f}")


def run(instances: int, root: Path) -> tuple[list[Result], list[str]]:
    notes: list[str] = []
    progress(f"writing {instances} CT instances")
    files = write_series(root / "series", instances)
    megabytes = sum(path.stat().st_size for path in files) / 1e6
    progress(f"series written: {megabytes:.1f} MB")

    targets: list[tuple[str, Callable[[Path], contextlib.AbstractContextManager[Target]]]] = [
        (EMBEDDED, hilum_embedded),
        (BARE, bare_scp),
    ]
    if orthanc_installed():
        targets.append((ORTHANC, orthanc))
    else:
        notes.append("Orthanc skipped: Debian's orthanc package is not installed")

    measured: list[Result | None] = [
        measure(name, start, files, n, root, notes) for name, start in targets for n in ASSOCIATIONS
    ]
    weed_dir = root / "seaweedfs"
    weed_dir.mkdir()
    try:
        with seaweedfs(weed_dir) as s3_port:
            start = hilum_postgres_s3(s3_port)
            measured += [measure(POSTGRES_S3, start, files, n, root, notes) for n in ASSOCIATIONS]
    except RuntimeError as error:
        notes.append(f"SeaweedFS did not start, {POSTGRES_S3} skipped: {error}")
    results = [r for r in measured if r is not None]
    order = [EMBEDDED, POSTGRES_S3, BARE, ORTHANC]
    results.sort(key=lambda r: (order.index(r.target), r.associations))
    return results, notes


def main() -> None:
    parser = argparse.ArgumentParser(description="C-STORE ingest throughput of Hilum")
    parser.add_argument("--instances", type=int, default=300, help="CT instances (default 300)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="hilum-ingest-bench-"))
    try:
        results, notes = run(args.instances, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"Hilum C-STORE ingest benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    )
    print(f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), storescu: DCMTK")
    print(f"series: {args.instances} x CT 512x512 16-bit, explicit VR little endian")
    print()
    print_table(results)
    print_ratios(results)
    if notes:
        print()
        print("notes:")
        for note in notes:
            print(f"  {note}")


if __name__ == "__main__":
    main()
