"""Scale-out: does a second process add throughput? PostgreSQL + S3 (SeaweedFS), as in production.

1. C-STORE: one synthetic CT series (512x512, ``--instances``, default 200) sent by DCMTK's
   ``storescu`` over 8 parallel associations to (a) one ``hilum dimse``, (b) two ``hilum dimse``
   behind a round-robin TCP proxy (this file's, in Python: it costs CPU of its own, as an HAProxy
   would, less), and (c) two ``hilum dimse`` with the associations split between their ports by
   the senders (no proxy). Reported: instances/s, and the instances indexed (none lost or twice).
2. AI: one or two ``hilum worker`` processes (CPU, ``stable_after_s = 0``) started and ready,
   then ``--studies`` synthetic CT studies (default 6, 8 slices of 128x128) imported; the time
   from the import's start until every job is done. Reported: jobs per minute, and the most
   attempts any job took (1: none ran twice).

Every measurement gets a fresh database and bucket. ``--rounds`` rounds (default 3), the targets
interleaved (their order reversed every other round); reported: the median rate and its range,
the CPU time of the Hilum processes per instance or job, and each target's ratio to the first,
from the same round (the median of those). Figures go to stdout, progress to stderr; nothing is
asserted. On a machine with fewer cores than processes the ratios say so.

    .venv/bin/python benchmarks/scale.py [--instances N] [--studies N] [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.ingest import (  # noqa: E402
    HILUM,
    POSTGRES,
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    STORESCU,
    postgres_database,
    seaweedfs,
    write_series,
)
from benchmarks.processes import (  # noqa: E402
    cpu_seconds,
    free_port,
    printed,
    progress,
    running,
    start_process,
    stop_process,
    wait_exited,
)

ASSOCIATIONS = 8
SEND_TIMEOUT_S = 1800


class RoundRobinProxy:
    """A TCP load balancer: each new connection goes to the next target, bytes piped both ways."""

    def __init__(self, targets: list[int]) -> None:
        self.targets = targets
        self._next = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            target = self.targets[self._next % len(self.targets)]
            self._next += 1
            upstream = socket.create_connection(("127.0.0.1", target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 18):
                sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


def environment(database: str, s3_port: int, data_dir: Path) -> dict[str, str]:
    return {
        "HILUM_SERVER__DATA_DIR": str(data_dir),
        "HILUM_STORAGE__DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
        "HILUM_STORAGE__BLOB_URL": f"s3://{database.replace('_', '-')}"
        f"?endpoint=http://127.0.0.1:{s3_port}",
        "HILUM_STORAGE__S3_ACCESS_KEY": S3_ACCESS_KEY,
        "HILUM_STORAGE__S3_SECRET_KEY": S3_SECRET_KEY,
        "HILUM_INFERENCE__STABLE_AFTER_S": "0",
        "HILUM_INFERENCE__POLL_INTERVAL_S": "0.2",
    }


def hilum_command(args: list[str], env: dict[str, str], log: Path) -> None:
    result = subprocess.run(
        [str(HILUM), *args], env={**os.environ, **env}, capture_output=True, text=True
    )
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"hilum {' '.join(args)} failed: {result.stderr[-2000:]}")


def scalar(database: str, sql: str) -> int:
    with psycopg.connect(f"{POSTGRES}/{database}") as db:
        row = db.execute(sql).fetchone()
    return int(row[0]) if row else 0


@contextlib.contextmanager
def dimse_processes(
    count: int, env: dict[str, str], workdir: Path
) -> Iterator[tuple[list[int], list[int]]]:
    """``count`` ``hilum dimse``: their ports and process ids."""
    with contextlib.ExitStack() as stack:
        ports, pids = [], []
        for n in range(count):
            port = free_port()
            log = workdir / f"dimse{n}.log"
            process_env = {**env, "HILUM_SERVER__DATA_DIR": str(workdir / f"dimse{n}"),
                           "HILUM_DIMSE__PORT": str(port)}  # fmt: skip
            process = stack.enter_context(
                running([HILUM, "dimse"], log, printed(log, "Hilum is listening"), process_env)
            )
            ports.append(port)
            pids.append(process.pid)
        yield ports, pids


def total_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def send(files: list[Path], ports: list[int], workdir: Path) -> float:
    """``ASSOCIATIONS`` storescu processes, association i to ``ports[i % len(ports)]``."""
    chunks = [files[i::ASSOCIATIONS] for i in range(ASSOCIATIONS)]
    started = time.perf_counter()
    processes = [
        start_process(
            [
                STORESCU,
                "-nh",
                "-aet",
                "BENCH",
                "-aec",
                "HILUM",
                "127.0.0.1",
                str(ports[i % len(ports)]),
                *chunk,
            ],
            workdir / f"storescu-{i}.log",
        )  # fmt: skip
        for i, chunk in enumerate(chunks)
    ]
    for process in processes:
        try:
            wait_exited(process, SEND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_process(process, grace_s=1)
    return time.perf_counter() - started


@dataclass(frozen=True)
class Measurement:
    seconds: float
    cpu_s: float  # of the Hilum processes measured (DIMSE, or workers), during the measurement
    note: str  # instances indexed, or the jobs' attempts


def measure_c_store(
    dimse: int, proxy: bool, files: list[Path], s3_port: int, root: Path
) -> Measurement:
    workdir = Path(tempfile.mkdtemp(dir=root))
    with postgres_database() as database:
        env = environment(database, s3_port, workdir / "data")
        hilum_command(["db", "upgrade"], env, workdir / "migrate.log")
        with dimse_processes(dimse, env, workdir) as (ports, pids):
            balancer = RoundRobinProxy(ports) if proxy else None
            cpu_before = total_cpu_seconds(pids)
            try:
                seconds = send(files, [balancer.port] if balancer else ports, workdir)
            finally:
                if balancer:
                    balancer.close()
            cpu = total_cpu_seconds(pids) - cpu_before
        indexed = scalar(database, "SELECT count(*) FROM instance")
    return Measurement(seconds, cpu, f"{indexed} indexed")


def measure_ai(workers: int, studies: Path, s3_port: int, root: Path) -> Measurement:
    workdir = Path(tempfile.mkdtemp(dir=root))
    with postgres_database() as database:
        env = environment(database, s3_port, workdir / "data")
        hilum_command(["db", "upgrade"], env, workdir / "migrate.log")
        count = len(list(studies.iterdir()))
        with contextlib.ExitStack() as stack:
            pids = []
            for n in range(workers):
                process_env = {**env, "HILUM_SERVER__DATA_DIR": str(workdir / f"worker{n}"),
                               "HILUM_INFERENCE__DEVICE": "cpu"}  # fmt: skip
                log = workdir / f"worker{n}.log"
                ready = printed(log, "Hilum worker")  # torch imported, models loaded
                pids.append(stack.enter_context(running([HILUM, "worker"], log, ready,
                                                        process_env)).pid)  # fmt: skip
            # From here: the import (the same for both), stability, the jobs.
            cpu_before = total_cpu_seconds(pids)
            started = time.perf_counter()
            hilum_command(["import", str(studies)], env, workdir / "import.log")
            done_sql = "SELECT count(*) FROM inference_job WHERE state = 'done'"
            while scalar(database, done_sql) < count:
                if time.perf_counter() - started > SEND_TIMEOUT_S:
                    raise RuntimeError(f"{workers} workers: jobs not done in {SEND_TIMEOUT_S} s")
                time.sleep(0.2)
            seconds = time.perf_counter() - started
            cpu = total_cpu_seconds(pids) - cpu_before
        attempts = scalar(database, "SELECT max(attempts) FROM inference_job")
        jobs = scalar(database, "SELECT count(*) FROM inference_job")
    return Measurement(seconds, cpu, f"{jobs} jobs, at most {attempts} attempt(s) each")


def write_ai_studies(directory: Path, count: int) -> None:
    from inference.phantoms import synthetic_ct_series
    from tests.factories import write_part10

    for seed in range(count):
        datasets, _mask = synthetic_ct_series(9000 + seed, slices=8)
        folder = directory / f"study{seed}"
        folder.mkdir(parents=True)
        for ds in datasets:
            write_part10(ds, folder / f"{ds.SOPInstanceUID}.dcm")


# The targets, each measured once per round; their order alternates from round to round.
C_STORE_TARGETS = {  # label: (DIMSE processes, through the TCP proxy)
    "1 hilum dimse": (1, False),
    "2 hilum dimse, TCP proxy": (2, True),
    "2 hilum dimse, senders split": (2, False),
}
AI_TARGETS = {"1 hilum worker": 1, "2 hilum worker": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description="Hilum scale-out: DIMSE and AI workers")
    parser.add_argument("--instances", type=int, default=200, help="CT instances (default 200)")
    parser.add_argument("--studies", type=int, default=6, help="AI studies (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()

    stores: dict[str, list[Measurement]] = {label: [] for label in C_STORE_TARGETS}
    ai: dict[str, list[Measurement]] = {label: [] for label in AI_TARGETS}
    root = Path(tempfile.mkdtemp(prefix="hilum-scale-bench-"))
    try:
        files = write_series(root / "series", args.instances)
        write_ai_studies(root / "studies", args.studies)
        weed = root / "seaweedfs"
        weed.mkdir()
        with seaweedfs(weed) as s3_port:
            for round_ in range(args.rounds):
                order = list(C_STORE_TARGETS) if round_ % 2 == 0 else list(C_STORE_TARGETS)[::-1]
                for label in order:
                    dimse, proxy = C_STORE_TARGETS[label]
                    m = measure_c_store(dimse, proxy, files, s3_port, root)
                    progress(f"round {round_ + 1}, {label}: {m.seconds:.1f} s, {m.note}")
                    stores[label].append(m)
                order = list(AI_TARGETS) if round_ % 2 == 0 else list(AI_TARGETS)[::-1]
                for label in order:
                    m = measure_ai(AI_TARGETS[label], root / "studies", s3_port, root)
                    progress(f"round {round_ + 1}, {label}: {m.seconds:.1f} s, {m.note}")
                    ai[label].append(m)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"Hilum scale-out benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))})")
    print(f"PostgreSQL + SeaweedFS S3 on this machine; C-STORE over {ASSOCIATIONS} associations;")
    print(f"{args.rounds} rounds, targets interleaved; medians, (min-max) ranges; ratio: the")
    print("median of each round's rate over the same round's first target")
    print()
    report("C-STORE", stores, args.instances, "inst/s", "CPU ms/inst", 1000)
    print()
    report("AI (CPU)", ai, args.studies, "jobs/min", "CPU s/job", 1, per=60)


def report(
    title: str,
    results: dict[str, list[Measurement]],
    count: int,
    unit: str,
    cpu_unit: str,
    cpu_scale: float,
    per: float = 1,
) -> None:
    """One line per target: median rate and its range, CPU per operation, the ratio to the
    first target (median over rounds of the ratio within each round), and what was checked."""
    print(f"{title:<30} {unit:>8} {'range':>13} {cpu_unit:>12} {'ratio':>6}  checked")
    labels = list(results)
    base = [count / m.seconds for m in results[labels[0]]]
    for label in labels:
        rates = [count / m.seconds * per for m in results[label]]
        ratios = [count / m.seconds / b for m, b in zip(results[label], base, strict=True)]
        cpu = statistics.median(m.cpu_s / count * cpu_scale for m in results[label])
        notes = sorted({m.note for m in results[label]})
        print(
            f"{label:<30} {statistics.median(rates):>8.1f} "
            f"{f'({min(rates):.1f}-{max(rates):.1f})':>13} {cpu:>12.1f} "
            f"{statistics.median(ratios):>6.2f}  {'; '.join(notes)}"
        )


if __name__ == "__main__":
    main()
