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

* C-MOVE of the study (Study Root, STUDY level) by DCMTK ``movescu``, and C-GET of it, once
  for each receiver, the same receivers for both servers (``--operations``; each C-MOVE
  destination known to both servers by its AE title):

  - ``c-move``, ``c-get``: DCMTK ``storescp --ignore`` (it receives every byte and answers each
    C-STORE, writes nothing; AE ``STORESCP``) and ``getscu --ignore``, 16 KB PDUs as shipped;
  - ``c-move-dcmtk-128k``, ``c-get-dcmtk-128k``: the same with ``-pdu 131072`` (AE
    ``STORESCP128``);
  - ``c-move-lean``, ``c-get-lean``: ``benchmarks/discard_store.py`` (a raw-socket Storage SCP,
    AE ``LEAN``, and C-GET SCU that skip each PDV's bytes; 128 KB PDUs), the C-GET timed by the
    client itself from its association request to its release (not the interpreter's start);
  - ``c-move-lean-x4``, ``c-get-lean-x4``: 4 retrieves at once to ``discard_store.py`` (one
    process per association), each for a quarter of the instances (IMAGE level, a list of SOP
    Instance UIDs), as a workstation retrieving series by series on several associations;

* WADO-RS of the whole study (``Accept: multipart/related; type="application/dicom"``, the
  stored syntax), read to its end by ``requests`` in 1 MiB chunks;
* STOW-RS of ``--instances`` new instances (a new study each round, the same bytes to both
  servers) from ``--stow-clients`` (4) concurrent clients, each a ``requests`` session posting
  its share in requests of ``--stow-batch`` (25) instances.

Every DCMTK tool (``storescu``, ``movescu``, ``getscu``, ``storescp``) runs with
``TCP_NODELAY=1`` and its default Maximum Length Received (16 KB) unless said above. Times run
from the start of the client (process or threads) to its end. For each operation and server the
script prints instances/s per round, their median and range, the server's CPU time per instance
(utime + stime of the server process, its threads and children, from /proc/<pid>/stat before
and after; 10 ms resolution), the receiver's (the C-MOVE destination's process, or the C-GET
clients' from getrusage) and the Hilum / Orthanc ratio of instances/s taken within each
round, its median and range, against the goal of issue 15. A count that is not the study's
(sub-operations completed, bytes received, instances stored) is printed as a note. Nothing is
asserted.

    .venv/bin/python benchmarks/retrieve.py [--instances 300] [--rounds 3]
        [--operations c-move,c-get,c-move-lean,...,wado-rs,stow-rs] [--stow-clients 4]
        [--stow-batch 25]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import resource
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
    wait_exited,
)

MOVESCU, GETSCU, STORESCP = "/usr/bin/movescu", "/usr/bin/getscu", "/usr/bin/storescp"
DISCARD_STORE = Path(__file__).resolve().parent / "discard_store.py"
CALLING_AE = "BENCH"
LARGE_PDU = 131072  # the largest Maximum Length Received DCMTK's tools take (-pdu)


@dataclass(frozen=True)
class Receiver:
    """A C-MOVE destination (``command``: the Storage SCP) or a C-GET SCU (``get``) that
    receives every instance and stores nothing; ``parallel`` retrieves at once, each for a
    share of the instances (IMAGE level, a list of SOP Instance UIDs)."""

    ae_title: str
    command: list[str]  # {port} and {ae} filled in
    get: list[str]  # the C-GET client; {port}, {ae}, {study} filled in, more -k keys added
    titles: tuple[str, str]  # (C-MOVE, C-GET)
    parallel: int = 1


RECEIVERS = {
    # DCMTK's tools as shipped: 16 KB PDUs.
    "dcmtk": Receiver(
        "STORESCP",
        [STORESCP, "-v", "--ignore", "-aet", "{ae}", "{port}"],
        [GETSCU, "-v", "-S", "--ignore"],
        ("C-MOVE to storescp --ignore (16 KB PDUs)", "C-GET by getscu --ignore (16 KB PDUs)"),
    ),
    "dcmtk-128k": Receiver(
        "STORESCP128",
        [STORESCP, "-v", "--ignore", "-pdu", str(LARGE_PDU), "-aet", "{ae}", "{port}"],
        [GETSCU, "-v", "-S", "--ignore", "-pdu", str(LARGE_PDU)],
        ("C-MOVE to storescp --ignore -pdu 131072", "C-GET by getscu --ignore -pdu 131072"),
    ),
    "lean": Receiver(
        "LEAN",
        [sys.executable, str(DISCARD_STORE), "serve", "--port", "{port}"],
        [sys.executable, str(DISCARD_STORE), "get"],
        ("C-MOVE to discard_store.py (128 KB PDUs)", "C-GET by discard_store.py (128 KB PDUs)"),
    ),
}
RECEIVERS["lean-x4"] = dataclasses.replace(
    RECEIVERS["lean"],
    titles=("4 C-MOVEs at once to discard_store.py", "4 C-GETs at once by discard_store.py"),
    parallel=4,
)
# operation -> (service, receiver)
RETRIEVES = {
    f"{service}{'' if name == 'dcmtk' else '-' + name}": (service, name)
    for name in RECEIVERS
    for service in ("c-move", "c-get")
}
OPERATIONS = (*RETRIEVES, "wado-rs", "stow-rs")
DEFAULT_OPERATIONS = ("c-move", "c-get", "wado-rs", "stow-rs")
# Issue 15's goals: Hilum's instances/s at least this multiple of Orthanc's.
GOALS = {**dict.fromkeys(RETRIEVES, 1.5), "wado-rs": 1.0, "stow-rs": 1.0}
TITLES = {
    **{
        operation: RECEIVERS[name].titles[service == "c-get"]
        for operation, (service, name) in RETRIEVES.items()
    },
    "wado-rs": "WADO-RS of the whole study",
    "stow-rs": "STOW-RS, new instances",
}
CLIENT_TIMEOUT_S = 900
# DCMTK's getscu logs the final response's counts with -v ("Number of Completed
# Suboperations : 300"); storescp -v a line for each C-STORE request.
COMPLETED = re.compile(r"Completed Suboperations\s*:\s*(\d+)")
# discard_store.py get: when it requested the association and ended (time.monotonic).
SPAN = re.compile(r"Monotonic from ([\d.]+) to ([\d.]+)")
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
    receiver_cpu_s: float | None  # None: WADO-RS and STOW-RS (the clients are this process)

    @property
    def rate(self) -> float:
        return self.instances / self.seconds

    @property
    def cpu_ms_per_instance(self) -> float:
        return self.cpu_s * 1000 / self.instances

    @property
    def receiver_cpu_ms_per_instance(self) -> float:
        return (self.receiver_cpu_s or 0.0) * 1000 / self.instances


# --- the operations -------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    study: str
    series: str
    instances: list[str]  # SOP Instance UIDs


def retrieve_command(
    service: str, receiver: Receiver, server: Server, study: Study, share: list[str] | None
) -> list[str]:
    """movescu, getscu or discard_store.py get for the study (``share`` None) or for a list of
    its instances at IMAGE level."""
    if receiver.get[0] != GETSCU and service == "c-get":
        command = [*receiver.get, "--port", str(server.dicom_port), "--called-ae",
                   server.ae_title, "--calling-ae", CALLING_AE, "--study", study.study]  # fmt: skip
        if share is not None:
            command += ["--series", study.series, "--uids", "\\".join(share)]
        return command
    tool = [MOVESCU, "-v", "-S", "-aem", receiver.ae_title] if service == "c-move" else receiver.get
    keys = ["-k", f"StudyInstanceUID={study.study}"]
    if share is None:
        keys += ["-k", "QueryRetrieveLevel=STUDY"]
    else:
        keys += ["-k", "QueryRetrieveLevel=IMAGE", "-k", f"SeriesInstanceUID={study.series}",
                 "-k", "SOPInstanceUID=" + "\\".join(share)]  # fmt: skip
    return [*tool, "-aet", CALLING_AE, "-aec", server.ae_title, *keys,
            "127.0.0.1", str(server.dicom_port)]  # fmt: skip


def run_retrieves(
    service: str, receiver: Receiver, server: Server, study: Study, work: Path
) -> list[str]:
    """The retrieve(s) at once; each client's log (empty when it failed)."""
    n = receiver.parallel
    shares = [study.instances[i::n] for i in range(n)] if n > 1 else [None]
    logs = [work / f"{service}-{i}.log" for i in range(len(shares))]
    processes = []
    for share, log in zip(shares, logs, strict=True):
        log.write_bytes(b"")
        command = retrieve_command(service, receiver, server, study, share)
        processes.append(start_process(command, log, DCMTK_NODELAY))
    outputs = []
    for process, log in zip(processes, logs, strict=True):
        try:
            wait_exited(process, CLIENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_process(process, grace_s=1)
        ok = process.returncode == 0
        outputs.append(log.read_text(errors="replace") if ok else "")
    return outputs


# What an operation returns: the instances moved (-1: failed) and, where the clients time
# themselves, the seconds from the first's start to the last's end (else None: the wall time).
Outcome = tuple[int, float | None]


def c_move(server: Server, study: Study, receiver: Receiver, work: Path) -> Outcome:
    """The instances the receiver got (its log's lines for them) if every final response was
    Success; -1 otherwise."""
    before = stores_received(receiver, work)
    outputs = run_retrieves("c-move", receiver, server, study, work)
    if not all("Final Move Response (Success)" in output for output in outputs):
        return -1, None
    return stores_received(receiver, work) - before, None


def stores_received(receiver: Receiver, work: Path) -> int:
    log = work / f"receiver-{receiver.ae_title}.log"
    return log.read_text(errors="replace").count(STORE_RECEIVED)


def c_get(server: Server, study: Study, receiver: Receiver, work: Path) -> Outcome:
    """The completed sub-operations of the final C-GET responses (getscu -v and
    discard_store.py print them), and discard_store.py's own span."""
    completed = 0
    spans = []
    for output in run_retrieves("c-get", receiver, server, study, work):
        counts = COMPLETED.findall(output)
        if not counts:
            return -1, None
        completed += int(counts[-1])
        spans += [(float(start), float(end)) for start, end in SPAN.findall(output)]
    if not spans:
        return completed, None
    return completed, max(end for _, end in spans) - min(start for start, _ in spans)


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
def receivers(work: Path) -> Iterator[dict[str, tuple[int, int]]]:
    """Every Move Destination, receiving and storing nothing: AE title -> (port, pid)."""
    started: dict[str, tuple[int, int]] = {}
    with contextlib.ExitStack() as stack:
        for receiver in RECEIVERS.values():
            if receiver.ae_title in started:
                continue
            port = free_port()
            command = [part.format(port=port, ae=receiver.ae_title) for part in receiver.command]
            log = work / f"receiver-{receiver.ae_title}.log"
            process = stack.enter_context(running(command, log, accepts_tcp(port), DCMTK_NODELAY))
            started[receiver.ae_title] = (port, process.pid)
        yield started


@contextlib.contextmanager
def hilum_server(work: Path, destinations: dict[str, tuple[int, int]]) -> Iterator[Server]:
    http_port = free_port()
    peers = [
        {"ae_title": ae, "host": "127.0.0.1", "port": port}
        for ae, (port, _) in destinations.items()
    ]
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
def orthanc_server(work: Path, destinations: dict[str, tuple[int, int]]) -> Iterator[Server]:
    modalities: dict[str, list[object]] = {
        ae.lower(): [ae, "127.0.0.1", port] for ae, (port, _) in destinations.items()
    }
    # The calling AE, known so that it may C-MOVE and C-GET.
    modalities["bench"] = [CALLING_AE, "127.0.0.1", next(iter(destinations.values()))[0]]
    overrides = {
        "DicomModalities": modalities,
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


def children_cpu_seconds() -> float:
    """CPU time of this process's children that exited and were waited for (the clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(
    operation: str,
    server: Server,
    round_number: int,
    run: Callable[[], Outcome],
    expected: int,
    notes: list[str],
    receiver_pid: int | None,
) -> Measurement:
    """``receiver_pid``: the Move Destination's process, whose CPU is the receiver's; else
    for a retrieve the clients' (C-GET), for WADO-RS and STOW-RS none."""
    cpu_before, clients_before = cpu_seconds(server.pid), children_cpu_seconds()
    receiver_before = cpu_seconds(receiver_pid) if receiver_pid else 0.0
    started = time.perf_counter()
    got, own_seconds = run()
    seconds = own_seconds or time.perf_counter() - started
    cpu_s = cpu_seconds(server.pid) - cpu_before
    receiver_cpu_s: float | None = None
    if receiver_pid:
        receiver_cpu_s = cpu_seconds(receiver_pid) - receiver_before
    elif operation in RETRIEVES:
        receiver_cpu_s = children_cpu_seconds() - clients_before
    if got != expected:
        notes.append(f"{operation}, {server.name}, round {round_number}: {got}, not {expected}")
    result = Measurement(
        operation, server.name, round_number, expected, seconds, cpu_s, receiver_cpu_s
    )
    progress(
        f"round {round_number}, {operation}, {server.name}: {result.rate:.1f} inst/s, "
        f"{result.cpu_ms_per_instance:.2f} ms CPU/inst, receiver "
        f"{result.receiver_cpu_ms_per_instance:.2f}"
    )
    return result


def rounds(
    args: argparse.Namespace,
    servers: list[Server],
    files: list[Path],
    study: Study,
    work: Path,
    notes: list[str],
    destinations: dict[str, tuple[int, int]],
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
            receiver_pid = None
            if operation in RETRIEVES and RETRIEVES[operation][0] == "c-move":
                receiver_pid = destinations[RECEIVERS[RETRIEVES[operation][1]].ae_title][1]
            for server in order:
                run = operation_run(operation, server, study, work, bodies, study_bytes)
                results.append(
                    measure(operation, server, k, run, args.instances, notes, receiver_pid)
                )
    return results


def operation_run(
    operation: str,
    server: Server,
    study: Study,
    work: Path,
    bodies: list[list[bytes]],
    study_bytes: int,
) -> Callable[[], Outcome]:
    """The operation on ``server``, returning how many instances it moved (-1: failed)."""
    if operation in RETRIEVES:
        service, name = RETRIEVES[operation]
        receiver = RECEIVERS[name]
        if service == "c-move":
            return lambda: c_move(server, study, receiver, work)
        return lambda: c_get(server, study, receiver, work)
    if operation == "wado-rs":
        # The multipart body holds every file whole: at least the files' bytes.
        expected = len(study.instances)
        return lambda: (expected if wado_rs(server, study.study) >= study_bytes else -1, None)
    return lambda: (stow_rs(server, bodies), None)


# --- report ---------------------------------------------------------------------------------


def receiver_cpu(measurements: list[Measurement]) -> str:
    if any(m.receiver_cpu_s is None for m in measurements):
        return "-"
    return spread([m.receiver_cpu_ms_per_instance for m in measurements], 2)


def report(results: list[Measurement], args: argparse.Namespace) -> None:
    by = {(r.operation, r.server, r.round): r for r in results}
    round_numbers = sorted({r.round for r in results})
    print(
        "| operation | round | Hilum inst/s | Orthanc inst/s | Hilum / Orthanc | "
        "Hilum CPU ms/inst | Orthanc CPU ms/inst | receiver CPU ms/inst (Hilum / Orthanc) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for operation in args.operations:
        for k in round_numbers:
            h, o = by[(operation, "Hilum", k)], by[(operation, "Orthanc", k)]
            print(
                f"| {operation} | {k} | {h.rate:.1f} | {o.rate:.1f} | {h.rate / o.rate:.2f} | "
                f"{h.cpu_ms_per_instance:.2f} | {o.cpu_ms_per_instance:.2f} | "
                f"{receiver_cpu([h])} / {receiver_cpu([o])} |"
            )
    print()
    print(
        "| operation | Hilum inst/s | Orthanc inst/s | Hilum / Orthanc (same round) | goal | "
        "Hilum CPU ms/inst | Orthanc CPU ms/inst | receiver CPU ms/inst (Hilum / Orthanc) |"
    )
    print("|---|---|---|---|---|---|---|---|")
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
            f"{spread([r.cpu_ms_per_instance for r in orthanc], 2)} | "
            f"{receiver_cpu(hilum)} / {receiver_cpu(orthanc)} |"
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
        headers = [dcmread(path, stop_before_pixels=True) for path in files]
        study = Study(
            str(headers[0].StudyInstanceUID),
            str(headers[0].SeriesInstanceUID),
            [str(header.SOPInstanceUID) for header in headers],
        )
        (work / "hilum").mkdir()
        with (
            receivers(work) as destinations,
            hilum_server(work / "hilum", destinations) as hilum_peer,
            orthanc_server(work / "orthanc", destinations) as orthanc_peer,
        ):
            if set(args.operations) != {"stow-rs"}:  # STOW-RS alone sends new studies only
                index = work / "hilum" / "data" / "index.sqlite"
                store_study(hilum_peer, files, work / "hilum", lambda: count_sqlite(index))
                store_study(orthanc_peer, files, work / "orthanc", orthanc_count(orthanc_peer))
            servers = [hilum_peer, orthanc_peer]
            results = rounds(args, servers, files, study, work, notes, destinations)
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
