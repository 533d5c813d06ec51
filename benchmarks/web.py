"""Server time of the web worklist (``GET /``) on a synthetic index: 100 000 studies by default.

What is measured: the time Flask's test client takes to answer ``GET /`` (the worklist query,
its AI state and STAT sub-queries, and the rendered page; no network), p50 and p95 over
``--repeat`` requests after one untimed, for the first page, the next page (keyset cursor), each
filter (patient name prefix, patient ID, accession, a one-month date range, modality, AI state
"findings") and a sort by patient name. The index is ``benchmarks/synthetic_index.py``'s (one
instance per study here), plus AI jobs: one study in ten has a done job (half with findings),
one in a hundred a queued STAT job, one in a thousand a failed one.

With ``--viewer OHIF_DIR`` (an installed viewer: ``hilum viewer install --dir OHIF_DIR``), also
the time from the click on "Open in viewer" on a study page to the first CT image drawn by OHIF,
for a 300-slice 512 x 512 synthetic CT series served by ``hilum serve``'s HTTP server on
loopback, in Chromium (Debian's, through Playwright). The image counts as drawn at Cornerstone's
first IMAGE_RENDERED event in the page (browser clock, the click on the same clock), checked by a
screenshot whose pixels must spread. ``--viewer-runs`` rounds, each a first open in a fresh
browser profile (nothing cached) and two repeated opens in the same profile (HTTP cache and V8's
code cache warm). Each open also reports when the viewer's requests went out (resource timing),
the CPU of Chromium's processes by kind and of the renderer's main thread, the CPU of Hilum's
HTTP server threads, and the server's own time per kind of request (its access log).

Figures go to stdout, progress to stderr; nothing is asserted.

    .venv/bin/python benchmarks/web.py [--studies N] [--database-url URL] [--repeat N]
        [--viewer OHIF_DIR] [--viewer-runs N]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
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


# In the viewer's page: when Cornerstone first draws an image into a viewport (its
# IMAGE_RENDERED event, caught on the way down so that no handler of OHIF's can stop it).
_RENDER_MARK = """
window.__hilumFirstImage = null;
document.addEventListener('CORNERSTONE_IMAGE_RENDERED', () => {
  window.__hilumFirstImage ??= performance.timeOrigin + performance.now();
}, true);
"""
# On the study page: the click on "Open in viewer", and when it happened (browser clock, ms).
_CLICK = """() => {
  const link = [...document.querySelectorAll('a')]
    .find(a => a.textContent.trim() === 'Open in viewer');
  const at = performance.timeOrigin + performance.now();
  link.click();
  return at;
}"""
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(stat_path: str) -> float:
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _browser_cpu() -> dict[int, tuple[str, float, float]]:
    """Chromium's processes (this process's descendants): pid -> (kind, CPU s, main thread
    CPU s); the kind is Chromium's --type (renderer, gpu-process, utility…) or "browser"."""
    found: dict[int, tuple[str, float, float]] = {}
    pending = [os.getpid()]
    while pending:
        try:
            with open(f"/proc/{pending[0]}/task/{pending[0]}/children") as f:
                children = [int(pid) for pid in f.read().split()]
        except OSError:
            children = []
        pending = pending[1:] + children
        for pid in children:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().replace(b"\0", b" ").decode(errors="replace").split()
                if not argv or "chrom" not in argv[0]:
                    continue
                kind = next((a[7:] for a in argv if a.startswith("--type=")), "browser")
                total = _cpu_seconds(f"/proc/{pid}/stat")
                main = _cpu_seconds(f"/proc/{pid}/task/{pid}/stat")
            except OSError:
                continue  # it ended meanwhile
            found[pid] = (kind, total, main)
    return found


def _server_cpu() -> float:
    """CPU seconds of the HTTP server's threads (cheroot's workers and its acceptor)."""
    total = 0.0
    for thread in threading.enumerate():
        name = thread.name
        if thread.native_id and (name.startswith("CP Server") or name == "http-server"):
            with contextlib.suppress(OSError):  # it ended meanwhile
                total += _cpu_seconds(f"/proc/{os.getpid()}/task/{thread.native_id}/stat")
    return total


class _AccessTimes(logging.Handler):
    """The server's own time per request (hilum.http.access), by kind of request."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: dict[str, list[float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        _, _, path, _, took = record.getMessage().rsplit(" ", 4)
        path = path.rstrip('"').split("?")[0]
        if "/frames/" in path:
            kind = "frames"
        elif path.endswith("/metadata"):
            kind = "metadata"
        elif path.startswith("/dicomweb/"):
            kind = "QIDO-RS"
        else:
            kind = "viewer files"
        self.times.setdefault(kind, []).append(float(took.removesuffix("ms")))


@dataclass
class ViewerOpen:
    seconds: float  # click on "Open in viewer" to the first image drawn
    steps: dict[str, float]  # seconds from the click: first QIDO-RS, metadata, first frame…
    browser_cpu: dict[str, float]  # CPU seconds by kind of Chromium process
    renderer_main_cpu: float  # the page's main thread (JavaScript, layout)
    server_cpu: float
    server_ms: dict[str, tuple[int, float]]  # kind -> (requests, total ms in the server)
    cached: int  # resources that did not come over the network (HTTP cache)


def _open_viewer(page: Any, study_url: str, access: _AccessTimes) -> ViewerOpen:
    import io

    import numpy as np
    from PIL import Image

    page.goto(study_url)
    page.wait_for_load_state("networkidle")
    access.times.clear()
    browser_before, server_before = _browser_cpu(), _server_cpu()
    clicked = page.evaluate(_CLICK)
    page.wait_for_function("window.__hilumFirstImage", timeout=120_000, polling=50)
    browser_after, server_after = _browser_cpu(), _server_cpu()
    drawn = page.evaluate("window.__hilumFirstImage")
    # The event says an image was drawn; the screenshot says it is the CT, not a blank one.
    canvas = page.locator(".cornerstone-canvas, canvas").first
    shot = Image.open(io.BytesIO(canvas.screenshot())).convert("L")
    if float(np.asarray(shot, dtype=np.float32).std()) <= 10.0:
        raise RuntimeError("the viewer drew a uniform image")
    origin = page.evaluate("performance.timeOrigin")
    resources = page.evaluate(
        "performance.getEntriesByType('resource').map(e => [e.name, e.startTime, e.responseEnd,"
        " e.transferSize])"
    )

    def first(test: Any, index: int) -> float:
        times = [entry[index] for entry in resources if test(entry[0])]
        return (origin + min(times) - clicked) / 1000 if times else float("nan")

    steps = {
        "app bundle received": first(lambda url: "/app.bundle." in url, 2),
        "first QIDO-RS": first(lambda url: "/dicomweb/studies?" in url, 1),
        "series metadata received": first(lambda url: url.endswith("/metadata"), 2),
        "first frame asked": first(lambda url: "/frames/" in url, 1),
        "first frame received": first(lambda url: "/frames/" in url, 2),
    }
    by_kind: dict[str, float] = {}
    main = 0.0
    for pid, (kind, total, main_thread) in browser_after.items():
        _, total_before, main_before = browser_before.get(pid, (kind, 0.0, 0.0))
        by_kind[kind] = by_kind.get(kind, 0.0) + total - total_before
        if kind == "renderer":
            main = max(main, main_thread - main_before)  # the viewer's renderer: the busiest
    return ViewerOpen(
        seconds=(drawn - clicked) / 1000,
        steps=steps,
        browser_cpu=by_kind,
        renderer_main_cpu=main,
        server_cpu=server_after - server_before,
        server_ms={kind: (len(t), sum(t)) for kind, t in access.times.items()},
        cached=sum(1 for entry in resources if entry[3] == 0),
    )


def _summary(name: str, opens: list[ViewerOpen]) -> str:
    def spread(values: list[float], unit: str = "s") -> str:
        return (
            f"median {statistics.median(values):.2f} {unit} ({min(values):.2f}–{max(values):.2f})"
        )

    lines = [f"{name}: open to first image {spread([o.seconds for o in opens])}"]
    steps = {step: [o.steps[step] for o in opens] for step in opens[0].steps}
    lines.append(
        "  steps after the click (medians): "
        + ", ".join(f"{step} {statistics.median(v):.2f} s" for step, v in steps.items())
    )
    kinds = sorted({kind for o in opens for kind in o.browser_cpu})
    cpu = {kind: [o.browser_cpu.get(kind, 0.0) for o in opens] for kind in kinds}
    lines.append(
        "  CPU (medians): Chromium "
        + spread([sum(o.browser_cpu.values()) for o in opens])
        + f" [{', '.join(f'{kind} {statistics.median(v):.2f}' for kind, v in cpu.items())}];"
        f" its renderer's main thread {spread([o.renderer_main_cpu for o in opens])};"
        f" Hilum's HTTP server {spread([o.server_cpu for o in opens])}"
    )
    kinds = sorted({kind for o in opens for kind in o.server_ms})
    counts = {kind: [o.server_ms.get(kind, (0, 0.0))[0] for o in opens] for kind in kinds}
    took = {kind: [o.server_ms.get(kind, (0, 0.0))[1] for o in opens] for kind in kinds}
    lines.append(
        "  server time (medians): "
        + ", ".join(
            f"{kind} {statistics.median(counts[kind]):.0f} requests "
            f"{statistics.median(took[kind]):.0f} ms"
            for kind in kinds
        )
        + f"; resources from the browser's cache {statistics.median([o.cached for o in opens]):.0f}"
    )
    return "\n".join(lines)


def time_first_image(settings: Settings, archive: Archive, ohif: Path, runs: int) -> None:
    """Seconds from "Open in viewer" on a 300-slice CT's study page to its first image drawn:
    in rounds, a first open (a fresh browser profile: nothing cached) then two repeated opens
    in the same profile (its HTTP cache and V8's code cache warm)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
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
    access = _AccessTimes()
    access_log = logging.getLogger("hilum.http.access")
    access_log.addHandler(access)
    access_log.setLevel(logging.INFO)
    server = HttpServer(create_app(app_settings, archive), "127.0.0.1", 0)
    server.start()
    study_url = f"http://127.0.0.1:{server.port}/studies/{study}"
    args = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--use-gl=swiftshader", "--enable-unsafe-swiftshader"]  # fmt: skip
    names = ("first open", "repeated open (2nd)", "repeated open (3rd)")
    opens: dict[str, list[ViewerOpen]] = {name: [] for name in names}
    failed = dict.fromkeys(names, 0)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=args)
            for run in range(runs):
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                context.add_init_script(_RENDER_MARK)
                page = context.new_page()
                for name in names:
                    try:
                        opened = _open_viewer(page, study_url, access)
                    except PlaywrightTimeout:
                        failed[name] += 1
                        print(f"round {run + 1}, {name}: no image in 120 s", file=sys.stderr)
                        continue
                    opens[name].append(opened)
                    steps = ", ".join(f"{k} {v:.2f} s" for k, v in opened.steps.items())
                    chromium = sum(opened.browser_cpu.values())
                    print(
                        f"round {run + 1}, {name}: {opened.seconds:.2f} s ({steps}; CPU: Chromium"
                        f" {chromium:.2f} s, Hilum {opened.server_cpu:.2f} s)",
                        file=sys.stderr,
                    )
                context.close()
            browser.close()
    finally:
        server.stop()
        access_log.removeHandler(access)
    print(
        f'OHIF, 300-slice CT (512 x 512), "Open in viewer" to first image, {runs} rounds '
        f"(load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs):"
    )
    for name in names:
        if opens[name]:
            print(_summary(name, opens[name]))
        if failed[name]:
            print(f"{name}: {failed[name]} of {runs} opens drew no image within 120 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--viewer", type=Path, help="an installed OHIF viewer: time it too")
    parser.add_argument("--viewer-runs", type=int, default=3, help="rounds of opens")
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
