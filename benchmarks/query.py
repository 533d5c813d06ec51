"""C-FIND latency and C-MOVE throughput of Hilum's Query/Retrieve SCP.

What is measured:

* C-FIND, Study Root, STUDY level, from a lean SCU in its own process
  (``benchmarks/find_scu.py``: a plain socket, responses read only as far as their status, so
  the figures are the SCP's, not a client's decoding) over one association to a running
  :class:`DimseServer` (in this process) on a synthetic index (``benchmarks/synthetic_index.py``,
  100 000 studies / 1 000 000 instances by default): p50 and p95 wall-clock time from sending
  the request to the final response, for a PatientName prefix wild card, an exact PatientID, a
  one-month StudyDate range, ModalitiesInStudy=CT and an exact AccessionNumber. Each query asks
  for the usual study-level return keys, NumberOfStudyRelatedInstances included. Each query
  runs once untimed first, except ModalitiesInStudy=CT (three quarters of the index).
* Memory: one universal C-FIND that streams every study of the index to that SCU, under
  :mod:`tracemalloc` in the SCP's process: the peak of the Python heap above its level at the
  start of the C-FIND. Memory held outside Python's allocator (SQLite's page cache) is not
  counted.
* C-MOVE: a 300-instance study of 512x512 CT instances (explicit VR little endian) moved to
  DCMTK's ``storescp``, started with ``TCP_NODELAY=1`` (without it, DCMTK's Nagle stalls each
  C-STORE response ~40 ms); instances/s from the C-MOVE request to the final response.

Hilum only: Orthanc is not compared. Figures go to stdout, progress to stderr; nothing is
asserted.

    .venv/bin/python benchmarks/query.py [--studies N] [--database-url URL] [--repeat N]
        [--large-repeat N] [--find-only] [--reuse-index] [--audit-rounds N]

``--audit-rounds N``: the same C-FIND queries through a second SCP over the same index without
the audit trail, in N interleaved rounds against the first (which writes one audit record per
query): the audit trail's cost per query, as a ratio within each round. Then the same for
QIDO-RS ``/studies`` (the exact PatientID and AccessionNumber queries and the PatientName
prefix): two HTTP servers (``server.app.HttpServer``) over the same archive, one with the trail
and one without, asked in turn over one keep-alive connection each by an ``http.client`` in
this process (so its CPU figure is the server's and the client's together).

``--reuse-index`` times the synthetic index already in ``--database-url`` (built by an earlier
run or by ``benchmarks/synthetic_index.py``) instead of building one: ~80 s saved per run on
PostgreSQL. Without it the database must be empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelMove,
)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.find_scu import find_from_another_process  # noqa: E402
from benchmarks.processes import DCMTK_NODELAY, environment  # noqa: E402
from benchmarks.synthetic_index import build_synthetic_index, existing_index_facts  # noqa: E402
from config import load_settings  # noqa: E402
from server.app import HttpServer, create_app  # noqa: E402
from server.dimse.ae import DimseServer  # noqa: E402
from storage.archive import open_archive  # noqa: E402
from storage.ingest import ingest_file  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.factories import ct_instance, write_part10  # noqa: E402

MOVE = StudyRootQueryRetrieveInformationModelMove
RETURN_KEYS = (
    "PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber",
    "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
)  # fmt: skip


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def traced(run: Any) -> tuple[Any, float]:
    """``run()`` under tracemalloc: its result and the peak heap growth in MB."""
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        result = run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, (peak - start) / 1e6


def compare_audit(
    settings: Any, archive: Any, audited: DimseServer, requests: list[dict[str, Any]], rounds: int
) -> None:
    """The same C-FIND queries against the same index through two SCPs in this process, one
    writing an audit record per query (as configured) and one without the audit trail, in
    interleaved rounds; per query the p50 wall time and the SCP's CPU time per request (this
    process's, the SCU being another), and their ratios on / off within each round."""
    quiet_settings = settings.model_copy(
        update={"dimse": settings.dimse.model_copy(update={"port": free_port()})}
    )
    quiet = DimseServer(quiet_settings, dataclasses.replace(archive, audit=None))
    quiet.start()
    requests = [{**r, "warm_up": True, "repeat": min(r["repeat"], 30)} for r in requests]
    medians: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    try:
        for n in range(rounds):
            order = [("on", audited), ("off", quiet)]
            for request in requests:
                for label, server in order if n % 2 == 0 else order[::-1]:
                    before = time.process_time()
                    (found,) = find_from_another_process(server.port, [request])
                    spent = time.process_time() - before
                    key = (found["name"], label)
                    medians.setdefault(key, []).append(statistics.median(found["ms"]))
                    # The warm-up request counts too.
                    cpu.setdefault(key, []).append(spent * 1000 / (request["repeat"] + 1))
    finally:
        quiet.stop()
    print(f"\n# C-FIND with the audit trail on against off, {rounds} interleaved rounds")
    print(
        "| query | p50 ms on | p50 ms off | p50 on / off | SCP CPU ms/query on | off "
        "| CPU on / off |"
    )
    print("|---|---|---|---|---|---|---|")
    for request in requests:
        name = request["name"]
        on, off = medians[(name, "on")], medians[(name, "off")]
        cpu_on, cpu_off = cpu[(name, "on")], cpu[(name, "off")]
        print(
            f"| {name} | {_spread(on)} | {_spread(off)} | {_ratios(on, off)} | "
            f"{_spread(cpu_on)} | {_spread(cpu_off)} | {_ratios(cpu_on, cpu_off)} |",
            flush=True,
        )


def compare_audit_qido(
    settings: Any, archive: Any, queries: dict[str, dict[str, str]], rounds: int, repeat: int
) -> None:
    """QIDO-RS ``/studies`` with the audit trail on against off: two HTTP servers over the same
    index in this process, asked in turn (A B B A ...) in ``rounds`` rounds of ``repeat``
    requests per query; the p50 of each round, its ratio on / off within the round, and the CPU
    per request of this process (server and client)."""
    from urllib.parse import urlencode

    servers = {
        "on": HttpServer(create_app(settings, archive), "127.0.0.1", free_port()),
        "off": HttpServer(
            create_app(settings, dataclasses.replace(archive, audit=None)), "127.0.0.1", free_port()
        ),
    }
    for server in servers.values():
        server.start()
    clients = {k: http.client.HTTPConnection("127.0.0.1", s.port) for k, s in servers.items()}

    def get(label: str, path: str) -> tuple[float, bytes]:
        start = time.perf_counter()
        clients[label].request("GET", path, headers={"Accept": "application/dicom+json"})
        response = clients[label].getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"QIDO-RS {path}: HTTP {response.status} {body[:200]!r}")
        return (time.perf_counter() - start) * 1000, body

    medians: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    matches: dict[str, int] = {}
    try:
        for name, params in queries.items():
            path = f"/dicomweb/studies?{urlencode(params)}"
            for label in servers:
                for _ in range(5):  # warm: the connection, the statement caches
                    _, body = get(label, path)
            matches[name] = body.count(b'"0020000D"')
            for n in range(rounds):
                order = ["on", "off"] if n % 2 == 0 else ["off", "on"]
                for label in order:
                    before = time.process_time()
                    samples = [get(label, path)[0] for _ in range(repeat)]
                    spent = time.process_time() - before
                    medians.setdefault((name, label), []).append(statistics.median(samples))
                    cpu.setdefault((name, label), []).append(spent * 1000 / repeat)
    finally:
        for client in clients.values():
            client.close()
        for server in servers.values():
            server.stop()
    print(f"\n# QIDO-RS /studies with the audit trail on against off, {rounds} interleaved rounds "
          f"of {repeat} requests")  # fmt: skip
    print(
        "| query | matches | p50 ms on | p50 ms off | p50 on / off | CPU ms/request on (server "
        "+ client) | off | CPU on / off |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in queries:
        on, off = medians[(name, "on")], medians[(name, "off")]
        cpu_on, cpu_off = cpu[(name, "on")], cpu[(name, "off")]
        print(
            f"| {name} | {matches[name]} | {_spread(on)} | {_spread(off)} | {_ratios(on, off)} | "
            f"{_spread(cpu_on)} | {_spread(cpu_off)} | {_ratios(cpu_on, cpu_off)} |",
            flush=True,
        )


def _ratios(on: list[float], off: list[float]) -> str:
    ratios = [a / b for a, b in zip(on, off, strict=True) if b]
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--database-url", default="", help="empty: SQLite in a temporary dir")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--large-repeat", type=int, default=0, help="ModalitiesInStudy=CT runs")
    parser.add_argument("--move-instances", type=int, default=300)
    parser.add_argument("--find-only", action="store_true", help="no memory or C-MOVE run")
    parser.add_argument(
        "--reuse-index", action="store_true", help="time the index already in --database-url"
    )
    parser.add_argument(
        "--audit-rounds",
        type=int,
        default=0,
        help="also time the C-FIND queries with the audit trail on against off, in N "
        "interleaved rounds (on, off, on, off, ...) of --repeat each",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hilum-query-bench-"))
    storescp_port = free_port()
    settings = load_settings(
        None,
        server={"data_dir": work / "data"},
        dimse={
            "port": free_port(),
            "peers": [{"ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp_port}],
        },
        storage={"database_url": args.database_url},
    )
    archive = open_archive(settings, migrate=True)
    started = time.perf_counter()
    facts = existing_index_facts(archive) if args.reuse_index else None
    if facts is None:
        facts = build_synthetic_index(archive, studies=args.studies, progress=log)
        log(f"synthetic index built in {time.perf_counter() - started:.0f} s: {facts}")
    else:
        log(f"synthetic index reused: {facts}")
    server = DimseServer(settings, archive)
    server.start()
    backend = "PostgreSQL" if args.database_url.startswith("postgresql") else "SQLite"
    print(f"# Hilum C-FIND, {backend}, {facts.studies} studies / {facts.instances} instances")
    print("| query | matches | p50 ms | p95 ms |")
    print("|---|---|---|---|")
    queries = {
        f"PatientName={facts.patient_name_prefix}": {"PatientName": facts.patient_name_prefix},
        f"PatientID={facts.patient_id}": {"PatientID": facts.patient_id},
        f"StudyDate={facts.month_range}": {"StudyDate": facts.month_range},
        "ModalitiesInStudy=CT": {"ModalitiesInStudy": "CT"},
        f"AccessionNumber={facts.accession_number}": {"AccessionNumber": facts.accession_number},
    }
    large_repeat = args.large_repeat or max(3, args.repeat // 10)
    requests = [
        {
            "name": name,
            "matching": matching,
            "return_keys": RETURN_KEYS,
            "repeat": large_repeat if "ModalitiesInStudy" in name else args.repeat,
            # Minutes each before the fast path: its first run counts, no warm-up.
            "warm_up": "ModalitiesInStudy" not in name,
        }
        for name, matching in queries.items()
    ]
    for found in find_from_another_process(server.port, requests):
        samples = sorted(found["ms"])
        p95 = samples[min(len(samples) - 1, int(len(samples) * 0.95))]
        median = statistics.median(samples)
        print(f"| {found['name']} | {found['matches']} | {median:.1f} | {p95:.1f} |", flush=True)
    if args.audit_rounds:
        compare_audit(settings, archive, server, requests, args.audit_rounds)
        qido = {
            name: matching
            for name, matching in queries.items()
            if not any(key in matching for key in ("ModalitiesInStudy", "StudyDate"))
        }
        compare_audit_qido(settings, archive, qido, args.audit_rounds, min(args.repeat, 30))
    if args.find_only:
        server.stop()
        archive.close()
        shutil.rmtree(work, ignore_errors=True)
        return 0

    universal = [{"name": "universal", "matching": {}, "return_keys": RETURN_KEYS}]
    universal[0] |= {"repeat": 1, "warm_up": False}
    (found,), peak_mb = traced(lambda: find_from_another_process(server.port, universal))
    print(
        f"\nuniversal C-FIND: {found['matches']} matches streamed in {found['ms'][0] / 1000:.1f}"
        f" s (SCP under tracemalloc); peak Python heap growth of the SCP {peak_mb:.1f} MB"
    )

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(MOVE)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="HILUM")
    study_uid, series_uid = generate_uid(), generate_uid()
    files = work / "move"
    files.mkdir()
    log(f"ingesting a {args.move_instances}-instance study for C-MOVE")
    for n in range(args.move_instances):
        ds = ct_instance(study_uid, series_uid, size=512, seed=n)
        ingest_file(archive, write_part10(ds, files / f"{n}.dcm"))
    received = work / "received"
    received.mkdir()
    storescp = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", "STORESCP", "-od", str(received), str(storescp_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(DCMTK_NODELAY),
    )  # fmt: skip
    try:
        time.sleep(1)
        move = Dataset()
        move.QueryRetrieveLevel = "STUDY"
        move.StudyInstanceUID = study_uid
        start = time.perf_counter()
        final = list(assoc.send_c_move(move, "STORESCP", MOVE))[-1][0]
        seconds = time.perf_counter() - start
    finally:
        storescp.terminate()
        storescp.wait(10)
    arrived = len(list(received.iterdir()))
    print(
        f"C-MOVE of {args.move_instances} CT 512x512 instances to storescp: status "
        f"0x{int(final.Status):04X}, {arrived} received, {args.move_instances / seconds:.1f} inst/s"
    )
    assoc.release()
    server.stop()
    archive.close()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
