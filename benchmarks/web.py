"""Server time of the web worklist (``GET /``) on a synthetic index: 100 000 studies by default.

What is measured: the time Flask's test client takes to answer ``GET /`` (the worklist query,
its AI state and STAT sub-queries, and the rendered page; no network), p50 and p95 over
``--repeat`` requests after one untimed, for the first page, the next page (keyset cursor), each
filter (patient name prefix, patient ID, accession, a one-month date range, modality, AI state
"findings") and a sort by patient name. The index is ``benchmarks/synthetic_index.py``'s (one
instance per study here), plus AI jobs: one study in ten has a done job (half with findings),
one in a hundred a queued STAT job, one in a thousand a failed one.

Not measured here (the issue's second figure): the time from "Open in viewer" to the first CT
image drawn in Chromium for a 300-slice series.

Figures go to stdout, progress to stderr; nothing is asserted.

    .venv/bin/python benchmarks/web.py [--studies N] [--database-url URL] [--repeat N]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

from sqlalchemy import insert, select, text, update

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.synthetic_index import build_synthetic_index  # noqa: E402
from config import load_settings  # noqa: E402
from server.app import create_app  # noqa: E402
from storage.archive import Archive, open_archive  # noqa: E402
from storage.index.models import InferenceJob, Study  # noqa: E402


def add_jobs(archive: Archive) -> None:
    now = datetime.datetime.now(datetime.UTC)
    with archive.index.read() as session:
        studies = session.execute(select(Study.id, Study.study_instance_uid)).all()
    rows = []
    for pk, uid in studies:
        if pk % 1000 == 0:
            state, priority, findings = "failed", 0, None
        elif pk % 100 == 0:
            state, priority, findings = "queued", 100, None
        elif pk % 10 == 0:
            state, priority, findings = "done", 0, pk % 20 // 10
        else:
            continue
        series = f"{uid}.9"
        rows.append(
            {
                "partition": archive.partition,
                "study_instance_uid": uid,
                "series_instance_uid": series,
                "model_name": "ct_lesion_synthetic",
                "model_version": "1.0.0",
                "job_key": f"hilum-inference\\default\\{uid}\\{series}\\ct_lesion_synthetic",
                "generation": 1,
                "state": state,
                "priority": priority,
                "attempts": 1,
                "input_received_at": now,
                "created_at": now,
                "queued_at": now,
                "not_before": now,
                "worker": "",
                "reason": "",
                "findings": findings,
            }
        )
    stat = [row["study_instance_uid"] for row in rows if row["priority"]]
    with archive.index.write() as session:
        for start in range(0, len(rows), 5000):
            session.execute(insert(InferenceJob), rows[start : start + 5000])
        # What storage.jobs.enqueue does for a STAT job.
        session.execute(
            update(Study).where(Study.study_instance_uid.in_(stat)).values(ai_priority=100)
        )
    if archive.index.dialect == "postgresql":
        with archive.index.engine.connect() as connection:  # what autovacuum does in time
            connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as data_dir:
        settings = load_settings(
            None, server={"data_dir": Path(data_dir)}, storage={"database_url": args.database_url}
        )
        archive = open_archive(settings, migrate=True)
        started = time.perf_counter()
        facts = build_synthetic_index(
            archive,
            studies=args.studies,
            instances_per_study=1,
            progress=lambda text: print(text, file=sys.stderr),
        )
        add_jobs(archive)
        print(
            f"index: {facts.studies} studies, jobs added, in {time.perf_counter() - started:.0f} s"
            f" ({archive.index.dialect})",
            file=sys.stderr,
        )
        client = create_app(settings, archive).test_client()
        first = client.get("/?limit=50")
        cursor = first.get_data(as_text=True).split("cursor=")[1].split('"')[0]
        month_from, month_to = facts.month_range.split("-")
        cases = {
            "first page": {},
            "next page (cursor)": {"cursor": cursor.replace("&amp;", "&")},
            "patient name prefix": {"name": facts.patient_name_prefix},
            "patient ID": {"patient_id": facts.patient_id},
            "accession": {"accession": facts.accession_number},
            "one month": {
                "date_from": f"{month_from[:4]}-{month_from[4:6]}-{month_from[6:]}",
                "date_to": f"{month_to[:4]}-{month_to[4:6]}-{month_to[6:]}",
            },
            "modality MR": {"modality": "MR"},
            "AI state findings": {"ai": "findings"},
            "sorted by patient name": {"sort": "patient_name", "order": "asc"},
        }
        print(f"GET / at {facts.studies} studies ({archive.index.dialect}), {args.repeat} runs:")
        print(f"{'case':<26} {'rows':>5} {'p50 ms':>8} {'p95 ms':>8}")
        for name, params in cases.items():
            url = "/?" + urlencode(params)
            response = client.get(url)
            assert response.status_code == 200, (name, response.status_code)
            rows = response.get_data(as_text=True).count("<tr class=")
            times = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                client.get(url)
                times.append((time.perf_counter() - started) * 1000)
            times.sort()
            p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
            print(f"{name:<26} {rows:>5} {statistics.median(times):>8.1f} {p95:>8.1f}")
        archive.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
