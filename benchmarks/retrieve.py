"""Sending a study: C-MOVE, C-GET, WADO-RS of the whole study and STOW-RS from 4 clients,
Hilum beside Orthanc on the same study, in the same run.

Both servers run on this machine at the same time, each in its own process, on free loopback
ports: Hilum as ``hilum serve`` on its embedded default (SQLite + files; DICOMweb on cheroot;
its AI worker off, so that no inference runs beside the transfers), Orthanc 1.10 with its
defaults and the DICOMweb plugin (Debian's ``orthanc`` and ``orthanc-dicomweb``, installed for
the benchmarks only; without them the script says so and stops), started with ``TCP_NODELAY=1``
(``benchmarks/orthanc.py``). Each holds the same study: ``--instances`` (300) synthetic CT
slices, 512x512, 16-bit, explicit VR little endian (``benchmarks/ingest.py``'s series, about
0.53 MB each), sent to both with DCMTK ``storescu`` before the first round (not with
``--operations stow-rs`` alone).

Each round measures, for each server in turn (Hilum first in odd rounds, Orthanc first in even
ones, so that neither always runs second):

* C-MOVE of the study (Study Root, STUDY level) by DCMTK ``movescu`` to one DCMTK ``storescp``
  (``--ignore``: it receives every byte and answers each C-STORE, writes nothing), the same
  receiver for both servers, known to both as ``STORESCP``;
* C-GET of the study by DCMTK ``getscu --ignore``;
* WADO-RS of the whole study (``Accept: multipart/related; type="application/dicom"``, the
  stored syntax), read to its end by ``requests`` in 1 MiB chunks;
* STOW-RS of ``--instances`` new instances (a new study each round, the same bytes to both
  servers) from ``--stow-clients`` (4) concurrent clients, each a ``requests`` session posting
  its share in requests of ``--stow-batch`` (25) instances.

Every DCMTK tool (``storescu``, ``movescu``, ``getscu``, ``storescp``) runs with
``TCP_NODELAY=1`` and its default Maximum Length Received (16 KB), as shipped. Times run from
the start of the client (process or threads) to its end. For each operation and server the
script prints instances/s per round, their median and range, the server's CPU time per instance
(utime + stime of the server process, its threads and children, from /proc/<pid>/stat before
and after; 10 ms resolution) and the Hilum / Orthanc ratio of instances/s taken within each
round, its median and range, against the goal of issue 15. A count that is not the study's
(sub-operations completed, bytes received, instances stored) is printed as a note. Nothing is
asserted.

    .venv/bin/python benchmarks/retrieve.py [--instances 300] [--rounds 3]
        [--operations c-move,c-get,wado-rs,stow-rs] [--stow-clients 4] [--stow-batch 25]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests
from pydicom import dcmread

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.dicomweb import BOUNDARY, stow_body  # noqa: E402
from benchmarks.ingest import Target, count_sqlite, hilum, send, spread, write_series  # noqa: E402
from benchmarks.orthanc import orthanc_installed, running_orthanc  # noqa: E402
from benchmarks.processes import (  # noqa: E402
    DCMTK_NODELAY,
    accepts_tcp,
    cpu_seconds,
    free_port,
    progress,
    running,
    start_process,
    stop_process,
)

MOVESCU, GETSCU, STORESCP = "/usr/bin/movescu", "/usr/bin/getscu", "/usr/bin/storescp"
RECEIVER_AE, CALLING_AE = "STORESCP", "BENCH"
OPERATIONS = ("c-move", "c-get", "wado-rs", "stow-rs")
# Issue 15's goals: Hilum's instances/s at least this multiple of Orthanc's.
GOALS = {"c-move": 1.5, "c-get": 1.5, "wado-rs": 1.0, "stow-rs": 1.0}
TITLES = {
    "c-move": "C-MOVE of the study to storescp",
    "c-get": "C-GET of the study (getscu)",
    "wado-rs": "WADO-RS of the whole study",
    "stow-rs": "STOW-RS, new instances",
}
CLIENT_TIMEOUT_S = 900
# DCMTK's getscu logs the final response's counts with -v ("Number of Completed
# Suboperations : 300"); storescp -v a line for each C-STORE request.
COMPLETED = re.compile(r"Completed Suboperations\s*:\s*(\d+)")
STORE_RECEIVED = "Received Store Request"


@dataclass(frozen=True)
class Server:
    name: str
    ae_title: str
    dicom_port: int
    dicomweb: str  # base URL of its DICOMweb service
    pid: int


@dataclass(frozen=True)
class Measurement:
    operation: str
    server: str
    round: int
    instances: int
    seconds: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.instances / self.seconds

    @property
    def cpu_ms_per_instance(self) -> float:
        return self.cpu_s * 1000 / self.instances


# --- the operations -------------------------------------------------------------------------


def dcmtk_retrieve(tool: list[str], server: Server, study: str, log: Path) -> str:
    """Run movescu or getscu for the whole study; its log (empty when it failed)."""
    command = [
        *tool, "-v", "-S", "-aet", CALLING_AE, "-aec", server.ae_title,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
        "127.0.0.1", str(server.dicom_port),
    ]  # fmt: skip
    log.write_bytes(b"")
    process = start_process(command, log, DCMTK_NODELAY)
    try:
        process.wait(timeout=CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_process(process, grace_s=1)
        return ""
    return log.read_text(errors="replace") if process.returncode == 0 else ""


def c_move(server: Server, study: str, work: Path) -> int:
    """The instances storescp received (its log's lines for them) if the final response was
    Success; -1 otherwise."""
    before = stores_received(work)
    output = dcmtk_retrieve([MOVESCU, "-aem", RECEIVER_AE], server, study, work / "movescu.log")
    if "Final Move Response (Success)" not in output:
        return -1
    return stores_received(work) - before


def stores_received(work: Path) -> int:
    return (work / "storescp.log").read_text(errors="replace").count(STORE_RECEIVED)


def c_get(server: Server, study: str, work: Path) -> int:
    """The completed sub-operations of the final C-GET response (getscu -v prints them)."""
    counts = COMPLETED.findall(dcmtk_retrieve([GETSCU, "--ignore"], server, study,
                                              work / "getscu.log"))  # fmt: skip
    return int(counts[-1]) if counts else -1


def wado_rs(server: Server, study: str) -> int:
    """The whole study as stored, read to its end; the bytes received."""
    received = 0
    headers = {"Accept": 'multipart/related; type="application/dicom"'}
    url = f"{server.dicomweb}/studies/{study}"
    with requests.get(url, headers=headers, stream=True, timeout=CLIENT_TIMEOUT_S) as response:
        response.raise_for_status()
        for chunk in response.iter_content(1 << 20):
            received += len(chunk)
    return received


def stow_rs(server: Server, bodies: list[list[bytes]]) -> int:
    """Each client's request bodies posted by its own session, the clients at once; the
    instances the servers said they stored (failed SOP sequences counted out)."""
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'

    def client(requests_of_client: list[bytes]) -> int:
        stored = 0
        with requests.Session() as session:
            for body in requests_of_client:
                response = session.post(
                    f"{server.dicomweb}/studies",
                    data=body,
                    headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
                    timeout=CLIENT_TIMEOUT_S,
                )
                response.raise_for_status()
                # PS3.18 10.5.3: (0008,1199) Referenced SOP Sequence lists what was stored.
                referenced = response.json().get("00081199", {}).get("Value", [])
                stored += len(referenced)
        return stored

    with ThreadPoolExecutor(len(bodies)) as pool:
        return sum(pool.map(client, bodies))


def stow_requests(files: list[Path], clients: int, batch: int) -> list[list[bytes]]:
    """The files as ``clients`` lists of STOW-RS bodies of ``batch`` instances each."""
    shares = [files[i::clients] for i in range(clients)]
    return [
        [
            stow_body([path.read_bytes() for path in share[first : first + batch]])
            for first in range(0, len(share), batch)
        ]
        for share in shares
    ]


# --- the servers ----------------------------------------------------------------------------


@contextlib.contextmanager
def receiver(work: Path) -> Iterator[int]:
    """DCMTK storescp receiving every C-MOVE sub-operation and storing nothing."""
    port = free_port()
    command = [STORESCP, "-v", "--ignore", "-aet", RECEIVER_AE, str(port)]
    with running(command, work / "storescp.log", accepts_tcp(port), DCMTK_NODELAY):
        yield port


@contextlib.contextmanager
def hilum_server(work: Path, receiver_port: int) -> Iterator[Server]:
    http_port = free_port()
    peers = [{"ae_title": RECEIVER_AE, "host": "127.0.0.1", "port": receiver_port}]
    env = {
        "HILUM_HTTP__PORT": str(http_port),
        "HILUM_DIMSE__PEERS": json.dumps(peers),
        "HILUM_INFERENCE__SERVE_WORKER": "false",
    }
    index = work / "data" / "index.sqlite"
    with hilum(work, "hilum", env, lambda: count_sqlite(index)) as target:
        yield Server(
            "Hilum", target.ae_title, target.port, f"http://127.0.0.1:{http_port}/dicomweb",
            target.pid,
        )  # fmt: skip


@contextlib.contextmanager
def orthanc_server(work: Path, receiver_port: int) -> Iterator[Server]:
    overrides = {
        # The C-MOVE destination, and the calling AE, known so that it may C-MOVE and C-GET.
        "DicomModalities": {
            "storescp": [RECEIVER_AE, "127.0.0.1", receiver_port],
            "bench": [CALLING_AE, "127.0.0.1", receiver_port],
        },
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
    }
    with running_orthanc(work, dicomweb=True, config_overrides=overrides) as peer:
        yield Server("Orthanc", peer.ae_title, peer.dicom_port, f"{peer.url}/dicom-web", peer.pid)


def store_study(server: Server, files: list[Path], work: Path, count: Callable[[], int]) -> None:
    target = Target(server.name, server.ae_title, server.dicom_port, server.pid, count)
    seconds, failures = send(files, target, 4, work, DCMTK_NODELAY)
    if failures:
        raise RuntimeError(f"storing the study in {server.name}: " + "; ".join(failures[:3]))
    progress(f"{server.name}: study stored in {seconds:.1f} s, it holds {count()} instances")


# --- measuring ------------------------------------------------------------------------------


def measure(
    operation: str,
    server: Server,
    round_number: int,
    run: Callable[[], int],
    expected: int,
    notes: list[str],
) -> Measurement:
    cpu_before = cpu_seconds(server.pid)
    started = time.perf_counter()
    got = run()
    seconds = time.perf_counter() - started
    cpu_s = cpu_seconds(server.pid) - cpu_before
    if got != expected:
        notes.append(f"{operation}, {server.name}, round {round_number}: {got}, not {expected}")
    result = Measurement(operation, server.name, round_number, expected, seconds, cpu_s)
    progress(
        f"round {round_number}, {operation}, {server.name}: {result.rate:.1f} inst/s, "
        f"{result.cpu_ms_per_instance:.2f} ms CPU/inst"
    )
    return result


def rounds(
    args: argparse.Namespace,
    servers: list[Server],
    files: list[Path],
    study: str,
    work: Path,
    notes: list[str],
) -> list[Measurement]:
    study_bytes = sum(path.stat().st_size for path in files)
    results: list[Measurement] = []
    for k in range(1, args.rounds + 1):
        order = servers if k % 2 else servers[::-1]
        bodies: list[list[bytes]] = []
        if "stow-rs" in args.operations:
            progress(f"round {k}: writing {args.instances} new instances for STOW-RS")
            stow_dir = work / f"stow-{k}"
            new = write_series(stow_dir, args.instances, seed=1000 + k)
            bodies = stow_requests(new, args.stow_clients, args.stow_batch)
            shutil.rmtree(stow_dir)
        for operation in args.operations:
            for server in order:
                run = operation_run(operation, server, study, work, bodies, study_bytes)
                results.append(measure(operation, server, k, run, args.instances, notes))
    return results


def operation_run(
    operation: str,
    server: Server,
    study: str,
    work: Path,
    bodies: list[list[bytes]],
    study_bytes: int,
) -> Callable[[], int]:
    """The operation on ``server``, returning how many instances it moved (-1: failed)."""
    if operation == "c-move":
        return lambda: c_move(server, study, work)
    if operation == "c-get":
        return lambda: c_get(server, study, work)
    if operation == "wado-rs":
        # The multipart body holds every file whole: at least the files' bytes.
        expected = len(list((work / "series").iterdir()))
        return lambda: expected if wado_rs(server, study) >= study_bytes else -1
    return lambda: stow_rs(server, bodies)


# --- report ---------------------------------------------------------------------------------


def report(results: list[Measurement], args: argparse.Namespace) -> None:
    by = {(r.operation, r.server, r.round): r for r in results}
    round_numbers = sorted({r.round for r in results})
    print(
        "| operation | round | Hilum inst/s | Orthanc inst/s | Hilum / Orthanc | "
        "Hilum CPU ms/inst | Orthanc CPU ms/inst |"
    )
    print("|---|---|---|---|---|---|---|")
    for operation in args.operations:
        for k in round_numbers:
            h, o = by[(operation, "Hilum", k)], by[(operation, "Orthanc", k)]
            print(
                f"| {operation} | {k} | {h.rate:.1f} | {o.rate:.1f} | {h.rate / o.rate:.2f} | "
                f"{h.cpu_ms_per_instance:.2f} | {o.cpu_ms_per_instance:.2f} |"
            )
    print()
    print(
        "| operation | Hilum inst/s | Orthanc inst/s | Hilum / Orthanc (same round) | goal | "
        "Hilum CPU ms/inst | Orthanc CPU ms/inst |"
    )
    print("|---|---|---|---|---|---|---|")
    for operation in args.operations:
        hilum = [by[(operation, "Hilum", k)] for k in round_numbers]
        orthanc = [by[(operation, "Orthanc", k)] for k in round_numbers]
        ratios = [h.rate / o.rate for h, o in zip(hilum, orthanc, strict=True)]
        goal = GOALS[operation]
        met = "met" if statistics.median(ratios) >= goal else "not met"
        print(
            f"| {TITLES[operation]} | {spread([r.rate for r in hilum])} | "
            f"{spread([r.rate for r in orthanc])} | {spread(ratios, 2)} | "
            f"{goal:.1f}x: {met} | {spread([r.cpu_ms_per_instance for r in hilum], 2)} | "
            f"{spread([r.cpu_ms_per_instance for r in orthanc], 2)} |"
        )


def operations(text: str) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in OPERATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown operation(s) {', '.join(unknown)}; choose from {', '.join(OPERATIONS)}"
        )
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--operations", type=operations, default=list(OPERATIONS))
    parser.add_argument("--stow-clients", type=int, default=4)
    parser.add_argument("--stow-batch", type=int, default=25)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    if not orthanc_installed(dicomweb=True):
        print("Orthanc: skipped (install Debian's orthanc and orthanc-dicomweb packages)")
        return 0

    started, load = time.monotonic(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="hilum-retrieve-bench-"))
    notes: list[str] = []
    try:
        progress(f"writing {args.instances} CT instances")
        files = write_series(work / "series", args.instances)
        megabytes = sum(path.stat().st_size for path in files) / 1e6
        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        (work / "hilum").mkdir()
        with (
            receiver(work) as receiver_port,
            hilum_server(work / "hilum", receiver_port) as hilum_peer,
            orthanc_server(work / "orthanc", receiver_port) as orthanc_peer,
        ):
            if set(args.operations) != {"stow-rs"}:  # STOW-RS alone sends new studies only
                index = work / "hilum" / "data" / "index.sqlite"
                store_study(hilum_peer, files, work / "hilum", lambda: count_sqlite(index))
                store_study(orthanc_peer, files, work / "orthanc", orthanc_count(orthanc_peer))
            results = rounds(args, [hilum_peer, orthanc_peer], files, study, work, notes)
    finally:
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    now = datetime.datetime.now().astimezone()
    print(f"Hilum sending a study, beside Orthanc, {now:%Y-%m-%d %H:%M %Z}")
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end; {time.monotonic() - started:.0f} s in all"
    )
    print(
        f"study: {args.instances} x CT 512x512 16-bit, explicit VR little endian "
        f"({megabytes:.1f} MB); {args.rounds} interleaved round(s); STOW-RS from "
        f"{args.stow_clients} clients, {args.stow_batch} instances per request"
    )
    print()
    report(results, args)
    if notes:
        print("\nnotes:")
        for note in notes:
            print(f"  {note}")
    return 0


def orthanc_count(server: Server) -> Callable[[], int]:
    base = server.dicomweb.removesuffix("/dicom-web")

    def count() -> int:
        with requests.get(f"{base}/statistics", timeout=10) as response:
            return int(response.json()["CountInstances"])

    return count


if __name__ == "__main__":
    sys.exit(main())
