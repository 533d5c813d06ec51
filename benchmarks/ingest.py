"""C-STORE ingest throughput: Hilum against a bare pynetdicom SCP and Orthanc.

What is measured: the wall-clock time DCMTK's ``storescu`` takes to send one synthetic CT
series (512x512, 16-bit allocated / 12 stored, explicit VR little endian, 300 instances by
default) to a target over 1 association (one storescu process with every file) and over 4
associations (4 storescu processes in parallel, each with a quarter of the files). The time
runs from starting storescu to the exit of the last one, so it includes storescu's own start
and file reading (the same for every target; the files are in the page cache).

Targets (``--targets``, default all), each started fresh for every measurement on free loopback
ports, and stopped after:

* ``hilum``: ``hilum serve``, embedded default (SQLite index + files under a temporary data
  dir), timed once it printed "Hilum is listening" (its AI worker loaded);
* ``hilum-no-audit``: the same with ``[audit] enabled = false``: the audit trail's cost is
  the ratio ``hilum`` / ``hilum-no-audit`` (likewise ``postgres-s3-no-audit``);
* ``hilum-processes``: the same with ``[dimse] processes = 2`` (two receiving processes);
* ``hilum-nagle``: the same, sent to by storescu *without* ``TCP_NODELAY`` (Nagle on, as DCMTK
  tools and many modalities ship): whether Hilum stalls on peers that leave Nagle on;
* ``postgres-s3``: ``hilum serve`` on PostgreSQL (a fresh ``hilum_bench_*`` database on
  127.0.0.1:5432) and S3 (a SeaweedFS ``weed mini`` server, one per run of this script, a fresh
  bucket per measurement);
* ``bare``: ``benchmarks/bare_scp.py``, pynetdicom writing each data set to a file, nothing
  else (with Hilum's default Maximum Length Received, so that both receive the same PDUs);
* ``orthanc``: Orthanc with its defaults (SQLite, fsync) and ``TCP_NODELAY=1`` in its
  environment, when Debian's ``orthanc`` package is installed (for the benchmark only);
* ``orthanc-postgres``: the same Orthanc with its index in PostgreSQL (a fresh
  ``hilum_bench_*`` database; Debian's ``orthanc-postgresql`` plugin), its files on disk: the
  peer of ``postgres-s3``;
* ``orthanc-nagle``: the same Orthanc without ``TCP_NODELAY``, sent to by storescu without it:
  the configuration earlier versions of this script measured, where Debian's DCMTK holds every
  C-STORE response ~40 ms for a delayed ACK. Labelled as stalled; no ratio is taken against it.

storescu gets ``TCP_NODELAY=1`` except where a row says otherwise. Targets are measured in
interleaved rounds (``--rounds``, default 3): in each round every target once on 1 association,
then every target once on 4, so that a slow phase of a shared machine hits all of them.

Reported per target and association count, over the rounds: median instances/s and its range
(min-max), MB/s (MB = 10^6 bytes of the Part 10 files sent), the server's CPU time per instance
(utime + stime from /proc/<pid>/stat of the server process, its threads and its children, read
before and after each send; resolution 10 ms; a PostgreSQL server or SeaweedFS is not counted),
its peak resident memory after the run (VmHWM from /proc/<pid>/status, the AI worker's models
included for Hilum) and "lost": the instances sent minus the instances the target holds
afterwards (Hilum's index, the bare SCP's files, Orthanc's statistics), the worst round.
Ratios of instances/s (Hilum / Orthanc, Hilum / bare SCP, ...) are taken within each round,
then their median and range are reported. Idle CPU, once per target and round on the fresh
server before its 4-association send: the server's CPU time during ``--idle-seconds`` (default
5) with no association, then with 4 associations open and idle (raw-socket associations of
``benchmarks/find_scu.py`` proposing CT Image Storage, measured from 0.5 s after the last one
was accepted). Figures go to stdout, progress to stderr; nothing is asserted.

    .venv/bin/python benchmarks/ingest.py [--instances 300] [--rounds 3] [--idle-seconds 5]
        [--targets hilum,orthanc,...]
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
import statistics
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

from benchmarks.find_scu import Connection  # noqa: E402
from benchmarks.orthanc import orthanc_installed, running_orthanc  # noqa: E402
from benchmarks.processes import (  # noqa: E402
    DCMTK_NAGLE,
    DCMTK_NODELAY,
    accepts_tcp,
    answers_http,
    cpu_seconds,
    free_port,
    peak_rss_bytes,
    printed,
    progress,
    running,
    start_process,
    stop_process,
    wait_exited,
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
IDLE_ASSOCIATIONS = 4
# After the last idle association is accepted, before its idle time is measured.
IDLE_SETTLE_S = 0.5
# Hilum's warnings and errors, tracebacks, and Orthanc's errors ("E0123 12:00:00.000 ...").
PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback|^E\d{4} ")
SEND_TIMEOUT_S = 1800

EMBEDDED = "hilum (sqlite+files)"
EMBEDDED_NAGLE = "hilum, storescu without TCP_NODELAY"
EMBEDDED_PROCESSES = "hilum, [dimse] processes = 2"
POSTGRES_S3 = "hilum (postgres+s3)"
EMBEDDED_NO_AUDIT = "hilum (sqlite+files), [audit] off"
POSTGRES_S3_NO_AUDIT = "hilum (postgres+s3), [audit] off"
BARE = "bare pynetdicom SCP"
ORTHANC = "orthanc (TCP_NODELAY=1)"
ORTHANC_NAGLE = "orthanc without TCP_NODELAY (stalled)"
ORTHANC_POSTGRES = "orthanc, PostgreSQL index (TCP_NODELAY=1)"
# Ratios of instances/s taken within each round: (numerator, denominator).
RATIOS = (
    (EMBEDDED, ORTHANC),
    (EMBEDDED_PROCESSES, ORTHANC),
    (POSTGRES_S3, ORTHANC),
    (POSTGRES_S3, ORTHANC_POSTGRES),
    (EMBEDDED, BARE),
    (POSTGRES_S3, EMBEDDED),
    (EMBEDDED_NAGLE, EMBEDDED),
    (ORTHANC_NAGLE, ORTHANC),
    # The audit trail's cost (goal: under 5 % slower): with it, against without it.
    (EMBEDDED, EMBEDDED_NO_AUDIT),
    (POSTGRES_S3, POSTGRES_S3_NO_AUDIT),
)
NO_AUDIT = {"HILUM_AUDIT__ENABLED": "false"}


@dataclass
class Target:
    """A listening C-STORE SCP: where to send, its process, how many instances it holds."""

    name: str
    ae_title: str
    port: int
    pid: int
    count_stored: Callable[[], int]
    logs: list[Path] = field(default_factory=list)


Starter = Callable[[Path], contextlib.AbstractContextManager[Target]]


@dataclass(frozen=True)
class Row:
    """One row of the report: a kind of target, and how storescu is started against it."""

    key: str  # for --targets
    name: str
    start: Starter
    storescu_env: dict[str, str | None] = field(default_factory=lambda: DCMTK_NODELAY)
    # Idle CPU is a property of the server, measured once per server configuration.
    idle: bool = True


@dataclass
class Result:
    target: str
    round: int
    associations: int
    instances: int
    nbytes: int
    seconds: float
    stored: int | None
    failures: list[str]
    cpu_s: float
    peak_rss: int
    idle_cpu_s: tuple[float, float] | None  # (no association, IDLE_ASSOCIATIONS idle)

    @property
    def lost(self) -> int | None:
        return None if self.stored is None else self.instances - self.stored

    @property
    def rate(self) -> float:
        return self.instances / self.seconds


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
    env = {"HILUM_SERVER__DATA_DIR": str(workdir / "data"), "HILUM_DIMSE__PORT": str(port),
           "HILUM_HTTP__PORT": str(free_port()), **env}  # fmt: skip
    # Measured once all of it runs: while the AI worker imports torch and loads its models,
    # the DIMSE port already accepts, at a fraction of the steady rate.
    with running([HILUM, "serve"], log, printed(log, "Hilum is listening"), env) as process:
        yield Target(name, "HILUM", port, process.pid, count, [log])


@contextlib.contextmanager
def hilum_embedded(workdir: Path) -> Iterator[Target]:
    with hilum(workdir, EMBEDDED, {}, lambda: count_sqlite(workdir / "data" / "index.sqlite")) as t:
        yield t


@contextlib.contextmanager
def hilum_embedded_no_audit(workdir: Path) -> Iterator[Target]:
    index = workdir / "data" / "index.sqlite"
    with hilum(workdir, EMBEDDED_NO_AUDIT, NO_AUDIT, lambda: count_sqlite(index)) as target:
        yield target


@contextlib.contextmanager
def hilum_two_processes(workdir: Path) -> Iterator[Target]:
    """The embedded default with a second receiving process on the DIMSE port (SO_REUSEPORT),
    so that a second core serves associations: the CPU figure counts both (children)."""
    index = workdir / "data" / "index.sqlite"
    env = {"HILUM_DIMSE__PROCESSES": "2"}
    with hilum(workdir, EMBEDDED_PROCESSES, env, lambda: count_sqlite(index)) as t:
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
    env: dict[str, str | None] = {
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
    }
    log = workdir / "weed.log"
    with running(command, log, answers_http(f"http://127.0.0.1:{s3}/"), env, timeout_s=60):
        yield s3


def hilum_postgres_s3(s3_port: int, *, audit: bool = True) -> Starter:
    name = POSTGRES_S3 if audit else POSTGRES_S3_NO_AUDIT

    @contextlib.contextmanager
    def start(workdir: Path) -> Iterator[Target]:
        with postgres_database() as database:
            env = {
                **({} if audit else NO_AUDIT),
                "HILUM_STORAGE__DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
                "HILUM_STORAGE__BLOB_URL": f"s3://{database.replace('_', '-')}"
                f"?endpoint=http://127.0.0.1:{s3_port}",
                "HILUM_STORAGE__S3_ACCESS_KEY": S3_ACCESS_KEY,
                "HILUM_STORAGE__S3_SECRET_KEY": S3_SECRET_KEY,
            }
            with hilum(workdir, name, env, lambda: count_postgres(database)) as target:
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
    with running(command, log, accepts_tcp(port)) as process:
        count = lambda: len(list(out.glob("*.dcm")))  # noqa: E731
        yield Target(BARE, "BARESCP", port, process.pid, count, [log])


def orthanc(name: str, *, nodelay: bool, postgresql: bool = False) -> Starter:
    @contextlib.contextmanager
    def start(workdir: Path) -> Iterator[Target]:
        with contextlib.ExitStack() as stack:
            database = stack.enter_context(postgres_database()) if postgresql else None
            peer = stack.enter_context(
                running_orthanc(workdir, nodelay=nodelay, postgresql_database=database)
            )
            yield Target(
                name, peer.ae_title, peer.dicom_port, peer.pid, peer.count_instances, [peer.log]
            )

    return start


# --- sending and measuring ------------------------------------------------------------------


def send(
    files: list[Path],
    target: Target,
    associations: int,
    workdir: Path,
    env: dict[str, str | None],
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
    processes = [
        start_process(base + chunk, log, env) for chunk, log in zip(chunks, logs, strict=True)
    ]
    failures: list[str] = []
    for process, log in zip(processes, logs, strict=True):
        try:
            wait_exited(process, SEND_TIMEOUT_S)
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


def idle_cpu(target: Target, seconds: float) -> tuple[float, float]:
    """The server's CPU seconds during ``seconds`` with no association, then during
    ``seconds`` with IDLE_ASSOCIATIONS associations open and idle (goal: zero)."""
    before = cpu_seconds(target.pid)
    time.sleep(seconds)
    alone = cpu_seconds(target.pid) - before
    with contextlib.ExitStack() as stack:
        for _ in range(IDLE_ASSOCIATIONS):
            connection = Connection(
                "127.0.0.1", target.port, target.ae_title, "BENCH", str(CTImageStorage)
            )
            stack.callback(connection.release)
        time.sleep(IDLE_SETTLE_S)
        before = cpu_seconds(target.pid)
        time.sleep(seconds)
        with_associations = cpu_seconds(target.pid) - before
    return alone, with_associations


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
    row: Row,
    files: list[Path],
    associations: int,
    round_number: int,
    idle_seconds: float,
    root: Path,
    notes: list[str],
) -> Result | None:
    """One measurement on a freshly started target; None (and a note) if it cannot start."""
    where = f"{row.name}, {associations} assoc, round {round_number}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{row.key}-{associations}-", dir=root))
    nbytes = sum(path.stat().st_size for path in files)
    progress(f"{where}: starting")
    stored: int | None = None
    logs: list[Path] = []
    idle: tuple[float, float] | None = None
    try:
        with row.start(workdir) as target:
            logs = target.logs
            if row.idle and idle_seconds > 0 and associations == IDLE_ASSOCIATIONS:
                progress(f"{where}: idle CPU, {idle_seconds:g} s without and with associations")
                idle = idle_cpu(target, idle_seconds)
            progress(f"{where}: listening on {target.port}; sending {len(files)} instances")
            cpu_before = cpu_seconds(target.pid)
            seconds, failures = send(files, target, associations, workdir, row.storescu_env)
            cpu_s = cpu_seconds(target.pid) - cpu_before
            peak_rss = peak_rss_bytes(target.pid)
            try:
                stored = target.count_stored()
            except Exception as error:  # noqa: BLE001 - reported, not raised
                failures.append(f"cannot count stored instances: {error}")
    except (RuntimeError, OSError, SystemExit, psycopg.Error) as error:
        # SystemExit: an idle association the target did not accept (benchmarks/find_scu.py).
        progress(f"{where}: skipped: {error}")
        notes.append(f"{where}: skipped, {str(error).splitlines()[0]}")
        return None
    finally:
        for log in logs:
            for line in log_problems(log):
                notes.append(f"{where}, {log.name}: {line}")
        shutil.rmtree(workdir, ignore_errors=True)
    result = Result(
        row.name, round_number, associations, len(files), nbytes, seconds, stored, failures,
        cpu_s, peak_rss, idle,
    )  # fmt: skip
    progress(
        f"{where}: {result.rate:.1f} inst/s, {cpu_s * 1000 / len(files):.2f} ms CPU/inst, "
        f"lost {result.lost}"
    )
    notes.extend(f"{where}: {line}" for line in failures)
    return result


# --- report ---------------------------------------------------------------------------------


def spread(values: list[float], digits: int = 1) -> str:
    """Median and range: ``12.3 (10.1-14.0)``; the median alone for one value."""
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def grouped(results: list[Result], rows: list[Row]) -> list[tuple[str, int, list[Result]]]:
    groups = []
    for n in ASSOCIATIONS:
        for row in rows:
            found = [r for r in results if r.target == row.name and r.associations == n]
            if found:
                groups.append((row.name, n, found))
    return groups


def print_table(results: list[Result], rows: list[Row]) -> None:
    header = (
        f"{'target':<38} {'assocs':>6} {'rounds':>6} {'inst/s median (range)':>23} "
        f"{'MB/s':>6} {'CPU ms/inst':>18} {'peak RSS MB':>11} {'lost':>4}"
    )
    print(header)
    print("-" * len(header))
    for name, n, found in grouped(results, rows):
        losses = [r.lost for r in found]
        lost = "?" if None in losses else str(max(x for x in losses if x is not None))
        mb_s = statistics.median(r.nbytes / 1e6 / r.seconds for r in found)
        cpu = spread([r.cpu_s * 1000 / r.instances for r in found], 2)
        rss = statistics.median(r.peak_rss / 2**20 for r in found)
        print(
            f"{name:<38} {n:>6} {len(found):>6} {spread([r.rate for r in found]):>23} "
            f"{mb_s:>6.1f} {cpu:>18} {rss:>11.0f} {lost:>4}"
        )


def print_ratios(results: list[Result]) -> None:
    rate = {(r.target, r.associations, r.round): r.rate for r in results}
    rounds = sorted({r.round for r in results})
    lines = []
    for numerator, denominator in RATIOS:
        for n in ASSOCIATIONS:
            ratios = [
                rate[(numerator, n, k)] / rate[(denominator, n, k)]
                for k in rounds
                if (numerator, n, k) in rate and (denominator, n, k) in rate
            ]
            if ratios:
                lines.append(
                    f"  {numerator} / {denominator}, {n} assoc: {spread(ratios, 2)}"
                    f"  [{len(ratios)} round(s)]"
                )
    if lines:
        print()
        print("ratios of instances/s within each round, median (range):")
        print("\n".join(lines))


def print_idle(results: list[Result], rows: list[Row], seconds: float) -> None:
    measured = [
        (row.name, [r.idle_cpu_s for r in results if r.target == row.name and r.idle_cpu_s])
        for row in rows
    ]
    measured = [(name, idle) for name, idle in measured if idle]
    if not measured:
        return
    print()
    print(
        f"idle: server CPU ms during {seconds:g} s, median (range) over rounds "
        f"(resolution 10 ms; goal 0 with idle associations)"
    )
    header = f"{'target':<38} {'no association':>18} {f'{IDLE_ASSOCIATIONS} idle associations':>22}"
    print(header)
    print("-" * len(header))
    for name, idle in measured:
        alone = spread([a * 1000 for a, _ in idle], 0)
        busy = spread([b * 1000 for _, b in idle], 0)
        print(f"{name:<38} {alone:>18} {busy:>22}")


# --- running --------------------------------------------------------------------------------


def all_rows(s3_port: int | None) -> list[Row]:
    rows = [
        Row("hilum", EMBEDDED, hilum_embedded),
        Row("hilum-no-audit", EMBEDDED_NO_AUDIT, hilum_embedded_no_audit, idle=False),
        Row("hilum-nagle", EMBEDDED_NAGLE, hilum_embedded, DCMTK_NAGLE, idle=False),
        Row("hilum-processes", EMBEDDED_PROCESSES, hilum_two_processes, idle=False),
    ]
    if s3_port is not None:
        rows.append(Row("postgres-s3", POSTGRES_S3, hilum_postgres_s3(s3_port)))
        rows.append(
            Row(
                "postgres-s3-no-audit",
                POSTGRES_S3_NO_AUDIT,
                hilum_postgres_s3(s3_port, audit=False),
                idle=False,
            )
        )
    rows.append(Row("bare", BARE, bare_scp))
    if orthanc_installed():
        rows.append(Row("orthanc", ORTHANC, orthanc(ORTHANC, nodelay=True)))
    if orthanc_installed(postgresql=True):
        rows.append(
            Row(
                "orthanc-postgres",
                ORTHANC_POSTGRES,
                orthanc(ORTHANC_POSTGRES, nodelay=True, postgresql=True),
                idle=False,
            )
        )
    if orthanc_installed():
        rows.append(
            Row(
                "orthanc-nagle",
                ORTHANC_NAGLE,
                orthanc(ORTHANC_NAGLE, nodelay=False),
                DCMTK_NAGLE,
                idle=False,
            )
        )
    return rows


TARGET_KEYS = (
    "hilum",
    "hilum-no-audit",
    "hilum-nagle",
    "hilum-processes",
    "postgres-s3",
    "postgres-s3-no-audit",
    "bare",
    "orthanc",
    "orthanc-postgres",
    "orthanc-nagle",
)


def run(args: argparse.Namespace, root: Path) -> tuple[list[Result], list[Row], list[str]]:
    notes: list[str] = []
    wanted = set(args.targets)
    if {"orthanc", "orthanc-nagle"} & wanted and not orthanc_installed():
        notes.append("Orthanc skipped: Debian's orthanc package is not installed")
    progress(f"writing {args.instances} CT instances")
    files = write_series(root / "series", args.instances)
    megabytes = sum(path.stat().st_size for path in files) / 1e6
    progress(f"series written: {megabytes:.1f} MB")

    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        s3_port = None
        if {"postgres-s3", "postgres-s3-no-audit"} & wanted:
            weed_dir = root / "seaweedfs"
            weed_dir.mkdir()
            try:
                s3_port = stack.enter_context(seaweedfs(weed_dir))
            except RuntimeError as error:
                notes.append(f"SeaweedFS did not start, {POSTGRES_S3} skipped: {error}")
        rows = [row for row in all_rows(s3_port) if row.key in wanted]
        # Interleaved: A B C, A B C, ... on 1 association, then on 4, in every round.
        for round_number in range(1, args.rounds + 1):
            for n in ASSOCIATIONS:
                for row in rows:
                    result = measure(row, files, n, round_number, args.idle_seconds, root, notes)
                    if result is not None:
                        results.append(result)
    return results, rows, notes


def target_keys(text: str) -> list[str]:
    keys = [key.strip() for key in text.split(",") if key.strip()]
    unknown = [key for key in keys if key not in TARGET_KEYS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGET_KEYS)}"
        )
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description="C-STORE ingest throughput of Hilum")
    parser.add_argument("--instances", type=int, default=300, help="CT instances (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=5.0,
        help="idle CPU window, with none and with 4 open associations (default 5; 0: skip)",
    )
    parser.add_argument(
        "--targets",
        type=target_keys,
        default=list(TARGET_KEYS),
        help=f"comma-separated subset of {','.join(TARGET_KEYS)} (default all)",
    )
    args = parser.parse_args()

    started = time.monotonic()
    load = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="hilum-ingest-bench-"))
    try:
        results, rows, notes = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"Hilum C-STORE ingest benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    )
    print(
        f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), load average "
        f"{load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
        f"{time.monotonic() - started:.0f} s in all"
    )
    print(
        f"series: {args.instances} x CT 512x512 16-bit, explicit VR little endian; "
        f"DCMTK storescu with TCP_NODELAY=1 unless a row says otherwise; {args.rounds} "
        "interleaved round(s)"
    )
    print()
    print_table(results, rows)
    print_ratios(results)
    print_idle(results, rows, args.idle_seconds)
    if notes:
        print()
        print("notes:")
        for note in notes:
            print(f"  {note}")


if __name__ == "__main__":
    main()
