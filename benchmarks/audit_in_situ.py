"""An audit record of a read where the read runs: a study-level search of a synthetic index (an
exact PatientID or AccessionNumber, as a C-FIND's or QIDO-RS's, the usual return keys) timed
alone; timed right after ``archive.record`` of its Query entry, with that record's own time
(as the worklist, WADO-RS and C-MOVE record theirs); and timed with its record written by the
search itself, on the search's own connection (``search(archive, query, audit)``, as C-FIND
and QIDO-RS do), the two together. In interleaved blocks, in one process, on CPU time (this
process's: the database server's is not counted).

``benchmarks/audit_record.py`` times records back to back: everything they touch stays in the
CPU's caches. Here each record follows a search and each search a record, as in a server: the
record's figure includes what the search evicted; the search's figure after a record includes
what the record costs the search (on SQLite, a commit on the trail's connection makes the
index connection's next read transaction drop its page cache: its pages are read again). The
last column is what a search with its record costs more than a search alone.

    .venv/bin/python benchmarks/audit_in_situ.py [--studies 5000] [--searches 300]
        [--blocks 6] [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/EMPTY_DB]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from audit_record import FIND_SCU, STUDY_ROOT_FIND  # noqa: E402
from synthetic_index import build_synthetic_index  # noqa: E402

from config import load_settings  # noqa: E402
from storage.archive import open_archive  # noqa: E402
from storage.audit import AuditEntry, query_entry  # noqa: E402
from storage.query import Query, QueryLevel, search  # noqa: E402

RETURN_KEYS = (
    "PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber",
    "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=5000)
    parser.add_argument("--searches", type=int, default=300, help="per block")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--database-url", default="", help="an empty database; empty: SQLite")
    parser.add_argument("--json-lines", default="", help='[audit] json_lines ("off": none)')
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hilum-audit-in-situ-"))
    settings = load_settings(
        None,
        server={"data_dir": work / "data"},
        storage={"database_url": args.database_url},
        audit={"json_lines": args.json_lines},
    )
    archive = open_archive(settings, migrate=True)
    facts = build_synthetic_index(archive, studies=args.studies)
    queries = [
        Query(QueryLevel.STUDY, {**dict.fromkeys(RETURN_KEYS, ""), key: value})
        for key, value in (
            ("PatientID", facts.patient_id),
            ("AccessionNumber", facts.accession_number),
        )
    ]

    def read(n: int) -> None:
        found = list(search(archive, queries[n % 2]))
        assert found

    def entry(n: int) -> AuditEntry:
        matching = {"PatientID": f"PID{n:07d}"}
        return query_entry("STUDY", matching, service="C-FIND", sop_class_uid=STUDY_ROOT_FIND)

    def record(n: int) -> None:
        archive.record(FIND_SCU, entry(n))

    def read_recorded(n: int) -> None:
        found = list(search(archive, queries[n % 2], (FIND_SCU, entry(n))))
        assert found

    for n in range(args.searches):  # warm: the statements, the caches
        read(n)
        record(n)
        read_recorded(n)
    alone: list[float] = []
    after: list[float] = []
    records: list[float] = []
    together: list[float] = []
    count = args.searches
    for _ in range(args.blocks):
        start = time.process_time()
        for n in range(count):
            read(n)
        alone.append((time.process_time() - start) / count * 1e6)
        spent_reading = spent_recording = 0.0
        for n in range(count):
            start = time.process_time()
            record(n)
            recorded = time.process_time()
            read(n)
            spent_recording += recorded - start
            spent_reading += time.process_time() - recorded
        after.append(spent_reading / count * 1e6)
        records.append(spent_recording / count * 1e6)
        start = time.process_time()
        for n in range(count):
            read_recorded(n)
        together.append((time.process_time() - start) / count * 1e6)
    archive.close()
    backend = "PostgreSQL" if args.database_url else "SQLite"
    print(
        "| backend | search alone | search after a record | record | record / search "
        "| search with its record | its extra |"
    )
    print("|---|---|---|---|---|---|---|")
    shares = [r / a for r, a in zip(records, alone, strict=True)]
    extra = [t - a for t, a in zip(together, alone, strict=True)]
    print(
        f"| {backend} | {_spread(alone)} | {_spread(after)} | {_spread(records)} | "
        f"{statistics.median(shares):.2f} ({min(shares):.2f}-{max(shares):.2f}) | "
        f"{_spread(together)} | {_spread(extra)} |"
    )
    return 0


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


if __name__ == "__main__":
    sys.exit(main())
