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

Every measurement gets a fresh database and bucket. Figures go to stdout, progress to stderr;
nothing is asserted. On a machine with fewer cores than processes the ratios say so.

    .venv/bin/python benchmarks/scale.py [--instances N] [--studies N]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
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
    free_port,
    printed,
    progress,
    running,
    start_process,
    stop_process,
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
def dimse_processes(count: int, env: dict[str, str], workdir: Path) -> Iterator[list[int]]:
    with contextlib.ExitStack() as stack:
        ports = []
        for n in range(count):
            port = free_port()
            log = workdir / f"dimse{n}.log"
            process_env = {**env, "HILUM_SERVER__DATA_DIR": str(workdir / f"dimse{n}"),
                           "HILUM_DIMSE__PORT": str(port)}  # fmt: skip
            stack.enter_context(
                running([HILUM, "dimse"], log, printed(log, "Hilum is listening"), process_env)
            )
            ports.append(port)
        yield ports


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
            process.wait(timeout=SEND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_process(process, grace_s=1)
    return time.perf_counter() - started


def measure_c_store(
    label: str, dimse: int, proxy: bool, files: list[Path], s3_port: int, root: Path
) -> tuple[str, float, int]:
    workdir = Path(tempfile.mkdtemp(dir=root))
    with postgres_database() as database:
        env = environment(database, s3_port, workdir / "data")
        hilum_command(["db", "upgrade"], env, workdir / "migrate.log")
        with dimse_processes(dimse, env, workdir) as ports:
            balancer = RoundRobinProxy(ports) if proxy else None
            try:
                seconds = send(files, [balancer.port] if balancer else ports, workdir)
            finally:
                if balancer:
                    balancer.close()
        indexed = scalar(database, "SELECT count(*) FROM instance")
    progress(f"{label}: {len(files)} instances in {seconds:.1f} s, {indexed} indexed")
    return label, seconds, indexed


def measure_ai(workers: int, studies: Path, s3_port: int, root: Path) -> tuple[int, float, str]:
    workdir = Path(tempfile.mkdtemp(dir=root))
    with postgres_database() as database:
        env = environment(database, s3_port, workdir / "data")
        hilum_command(["db", "upgrade"], env, workdir / "migrate.log")
        count = len(list(studies.iterdir()))
        with contextlib.ExitStack() as stack:
            for n in range(workers):
                process_env = {**env, "HILUM_SERVER__DATA_DIR": str(workdir / f"worker{n}"),
                               "HILUM_INFERENCE__DEVICE": "cpu"}  # fmt: skip
                log = workdir / f"worker{n}.log"
                ready = printed(log, "Hilum worker")  # torch imported, models loaded
                stack.enter_context(running([HILUM, "worker"], log, ready, process_env))
            # From here: the import (the same for both), stability, the jobs.
            started = time.perf_counter()
            hilum_command(["import", str(studies)], env, workdir / "import.log")
            done_sql = "SELECT count(*) FROM inference_job WHERE state = 'done'"
            while scalar(database, done_sql) < count:
                if time.perf_counter() - started > SEND_TIMEOUT_S:
                    raise RuntimeError(f"{workers} workers: jobs not done in {SEND_TIMEOUT_S} s")
                time.sleep(0.2)
            seconds = time.perf_counter() - started
        attempts = scalar(database, "SELECT max(attempts) FROM inference_job")
        jobs = scalar(database, "SELECT count(*) FROM inference_job")
    summary = f"{jobs} jobs, at most {attempts} attempt(s) each"
    progress(f"{workers} worker(s): {count} studies in {seconds:.1f} s ({summary})")
    return workers, seconds, summary


def write_ai_studies(directory: Path, count: int) -> None:
    from inference.phantoms import synthetic_ct_series
    from tests.factories import write_part10

    for seed in range(count):
        datasets, _mask = synthetic_ct_series(9000 + seed, slices=8)
        folder = directory / f"study{seed}"
        folder.mkdir(parents=True)
        for ds in datasets:
            write_part10(ds, folder / f"{ds.SOPInstanceUID}.dcm")


def main() -> None:
    parser = argparse.ArgumentParser(description="Hilum scale-out: DIMSE and AI workers")
    parser.add_argument("--instances", type=int, default=200, help="CT instances (default 200)")
    parser.add_argument("--studies", type=int, default=6, help="AI studies (default 6)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="hilum-scale-bench-"))
    try:
        files = write_series(root / "series", args.instances)
        write_ai_studies(root / "studies", args.studies)
        weed = root / "seaweedfs"
        weed.mkdir()
        with seaweedfs(weed) as s3_port:
            stores = [
                measure_c_store("1 hilum dimse", 1, False, files, s3_port, root),
                measure_c_store("2 hilum dimse, TCP proxy", 2, True, files, s3_port, root),
                measure_c_store("2 hilum dimse, senders split", 2, False, files, s3_port, root),
            ]
            ai = [measure_ai(n, root / "studies", s3_port, root) for n in (1, 2)]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"Hilum scale-out benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))})")
    print(f"PostgreSQL + SeaweedFS S3 on this machine; C-STORE over {ASSOCIATIONS} associations")
    print()
    print(f"{'C-STORE':<32} {'seconds':>8} {'inst/s':>8} {'indexed':>8} {'ratio':>6}")
    base = args.instances / stores[0][1]
    for label, seconds, indexed in stores:
        rate = args.instances / seconds
        print(f"{label:<32} {seconds:>8.1f} {rate:>8.1f} {indexed:>8} {rate / base:>6.2f}")
    print()
    print(f"{'AI (CPU)':<32} {'seconds':>8} {'jobs/min':>8} {'ratio':>6}  jobs")
    ai_base = args.studies / ai[0][1]
    for workers, seconds, summary in ai:
        rate = args.studies / seconds
        label = f"{workers} hilum worker"
        print(f"{label:<32} {seconds:>8.1f} {rate * 60:>8.1f} {rate / ai_base:>6.2f}  {summary}")


if __name__ == "__main__":
    main()
