"""The cost of one audit record of a read: ``Archive.record`` of a C-FIND's and of a QIDO-RS's
Query entry (PS3.15 A.5.3.10), as the C-FIND SCP and QIDO-RS write it before their answer.

What is measured, per backend (SQLite in WAL mode under a temporary directory; PostgreSQL when
``--database-url`` names a server, a fresh database created and dropped there) and with the
JSON lines copy on (a file) and off: wall-clock and CPU time (this process's) per record over
``--records`` records, in ``--rounds`` rounds; median and range of the rounds. Then, with
``--profile``, where the CPU of a record goes (cProfile, CPU clock), by function.

The figure is what a query pays for being audited; ``benchmarks/query.py --audit-rounds``
measures the same through the SCPs, where the noise of a shared machine hides a fraction of a
millisecond. To compare two versions of ``storage/audit.py``, run this script from each
checkout in turn, a few times each (A B A B). Figures go to stdout; nothing is asserted.

``--threads N``: N readers record at once, the records shared out among them (the wall and CPU
figures stay per record): what group commit makes of concurrent readers' records.

    .venv/bin/python benchmarks/audit_record.py [--records 500] [--rounds 5] [--threads 1]
        [--database-url postgresql://postgres@127.0.0.1:5432] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from config import load_settings  # noqa: E402
from storage.archive import open_archive  # noqa: E402
from storage.audit import Actor, ActorPrincipal, query_entry  # noqa: E402

FIND_SCU = Actor(ActorPrincipal("ae", "FINDSCU"), "127.0.0.1", "dimse", request_id="assoc-1")
WEB_USER = Actor(ActorPrincipal("user", "alice", "tok-1"), "10.0.0.7", "http", request_id="r1")
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@contextlib.contextmanager
def database(server_url: str) -> Iterator[str]:
    """A fresh database on ``server_url`` (dropped after), or "" for SQLite."""
    if not server_url:
        yield ""
        return
    name = f"hilum_audit_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server_url.rstrip("/") + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        base = server_url.rstrip("/").replace("postgresql://", "postgresql+psycopg://", 1)
        yield f"{base}/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def measure(
    url: str, json_lines: str, records: int, rounds: int, profile: bool, threads: int = 1
) -> str:
    work = Path(tempfile.mkdtemp(prefix="hilum-audit-bench-"))
    settings = load_settings(
        None,
        server={"data_dir": work / "data"},
        storage={"database_url": url},
        audit={"json_lines": json_lines},
    )
    archive = open_archive(settings, migrate=True)

    def one(n: int) -> None:
        # As the SCPs make them: the C-FIND's and QIDO-RS's entries, in turn.
        if n % 2:
            entry = query_entry(
                "STUDY",
                {"PatientID": f"PID{n:07d}", "StudyDate": ""},
                service="C-FIND",
                sop_class_uid=STUDY_ROOT_FIND,
            )
            archive.record(FIND_SCU, entry)
        else:
            entry = query_entry(
                "STUDY", {"AccessionNumber": f"ACC{n:08d}"}, service="QIDO-RS", resource="studies"
            )
            archive.record(WEB_USER, entry)

    def some(first: int, count: int) -> None:
        for n in range(first, first + count):
            one(n)

    for n in range(50):
        one(n)
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        if threads == 1:
            some(0, records)
        else:
            share = records // threads
            workers = [
                threading.Thread(target=some, args=(t * share, share)) for t in range(threads)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        walls.append((time.perf_counter() - wall) / records * 1e6)
        cpus.append((time.process_time() - cpu) / records * 1e6)
    if profile:
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        for n in range(records):
            one(n)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
    archive.close()
    backend = "PostgreSQL" if url else "SQLite"
    lines = "file" if json_lines == "" else json_lines
    return (
        f"| {backend} | {lines} | {threads} | {statistics.median(walls):.0f} ({min(walls):.0f}-"
        f"{max(walls):.0f}) | {statistics.median(cpus):.0f} ({min(cpus):.0f}-{max(cpus):.0f}) |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--database-url",
        default="",
        help="a PostgreSQL server (postgresql://user@host:port) to measure besides SQLite",
    )
    parser.add_argument("--profile", action="store_true", help="where the CPU goes, by function")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="readers recording at once (the records are shared out among them): group commit",
    )
    args = parser.parse_args()
    rows = []
    for server in ["", args.database_url] if args.database_url else [""]:
        with database(server) as url:
            for json_lines in ("", "off"):
                rows.append(
                    measure(url, json_lines, args.records, args.rounds, args.profile, args.threads)
                )
    print("| backend | JSON lines | threads | wall µs per record | CPU µs per record |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
