"""Server time of the web worklist (``GET /``) on a synthetic index: 100 000 studies by default.

What is measured: the time Flask's test client takes to answer ``GET /`` (the worklist query,
its AI state and STAT sub-queries, and the rendered page; no network), p50 and p95 over
``--repeat`` requests after one untimed, for the first page, the next page (keyset cursor), each
filter (patient name prefix, patient ID, accession, a one-month date range, modality, AI state
"findings") and a sort by patient name. The index is ``benchmarks/synthetic_index.py``'s (one
instance per study here), plus AI jobs: one study in ten has a done job (half with findings),
one in a hundred a queued STAT job, one in a thousand a failed one.

With ``--viewer OHIF_DIR`` (an installed viewer: ``hilum viewer install --dir OHIF_DIR``), also
the time from opening ``/viewer?StudyInstanceUIDs=…`` in Chromium (Debian's, through Playwright)
to the first CT image drawn, for a 300-slice 512 x 512 synthetic CT series served by ``hilum
serve``'s HTTP server on loopback: the canvas is screenshotted every ~0.1 s until its pixels
spread (so the figure is at most one screenshot late), ``--viewer-runs`` times, each in a fresh
browser context (nothing cached).

Figures go to stdout, progress to stderr; nothing is asserted.

    .venv/bin/python benchmarks/web.py [--studies N] [--database-url URL] [--repeat N]
        [--viewer OHIF_DIR] [--viewer-runs N]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import insert, select, text, update

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.synthetic_index import build_synthetic_index  # noqa: E402
from config import Settings, load_settings  # noqa: E402
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


def _watch_requests(page: Any) -> dict[str, float]:
    """When the viewer first asks QIDO-RS, first asks for a frame and first receives one."""
    marks: dict[str, float] = {}

    def on_request(request: Any) -> None:
        if "/dicomweb/studies?" in request.url:
            marks.setdefault("first QIDO-RS", time.perf_counter())
        elif "/frames/" in request.url:
            marks.setdefault("first frame asked", time.perf_counter())

    def on_response(response: Any) -> None:
        if "/frames/" in response.url:
            marks.setdefault("first frame received", time.perf_counter())

    page.on("request", on_request)
    page.on("response", on_response)
    return marks


def time_first_image(settings: Settings, archive: Archive, ohif: Path, runs: int) -> None:
    """Seconds from opening the viewer on a 300-slice CT to its first image drawn."""
    import io

    import numpy as np
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from inference.phantoms import synthetic_ct_series
    from server.app import HttpServer
    from storage.ingest import Origin, ingest_file

    print("writing a 300-slice CT series", file=sys.stderr)
    datasets, _ = synthetic_ct_series(9, slices=300, size=512)
    folder = Path(settings.server.data_dir) / "bench-ct"
    folder.mkdir()
    for i, ds in enumerate(datasets):
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        ingest_file(archive, path, Origin())
    study = datasets[0].StudyInstanceUID
    app_settings = settings.model_copy(
        update={"web": settings.web.model_copy(update={"ohif_dir": ohif})}
    )
    server = HttpServer(create_app(app_settings, archive), "127.0.0.1", 0)
    server.start()
    url = f"http://127.0.0.1:{server.port}/viewer?StudyInstanceUIDs={study}"
    args = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--use-gl=swiftshader", "--enable-unsafe-swiftshader"]  # fmt: skip
    seconds = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=args)
            for run in range(runs):
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                marks = _watch_requests(page)
                started = marks["start"] = time.perf_counter()
                page.goto(url)
                while time.perf_counter() - started < 120:
                    canvas = page.locator(".cornerstone-canvas, canvas").first
                    if canvas.count() and (box := canvas.bounding_box()) and box["width"] > 50:
                        shot = Image.open(io.BytesIO(canvas.screenshot())).convert("L")
                        if float(np.asarray(shot, dtype=np.float32).std()) > 10.0:
                            break
                    time.sleep(0.1)
                seconds.append(time.perf_counter() - started)
                steps = ", ".join(
                    f"{name} {at - started:.2f} s" for name, at in marks.items() if name != "start"
                )
                print(f"viewer run {run + 1}: {seconds[-1]:.2f} s ({steps})")
                context.close()
            browser.close()
    finally:
        server.stop()
    print(
        f"OHIF, 300-slice CT (512 x 512), open to first image: median "
        f"{statistics.median(seconds):.2f} s, min {min(seconds):.2f} s, max {max(seconds):.2f} s"
        f" over {runs} runs"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--viewer", type=Path, help="an installed OHIF viewer: time it too")
    parser.add_argument("--viewer-runs", type=int, default=3)
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
        if args.viewer:
            time_first_image(settings, archive, args.viewer, args.viewer_runs)
        archive.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
