"""WADO-RS retrieval of one frame from a whole-slide image of many frames: what the frame table
costs per request (issue 15: the table of a 2 GB slide of 256x256 tiles has ~100 000 entries).

The embedded default (SQLite + files under a temporary folder), the app on
``server.app.HttpServer`` in this process. Two slides are ingested (``storage.ingest``): one of
``--frames`` frames (default 100 000) and one of 256, every frame a few bytes that begin with a
JPEG SOI marker (no offset table), so that a request's time is the index look-up, the frame
table and the HTTP exchange, not the bytes. Each round requests ``--requests`` random frames of
each slide, as stored (``transfer-syntax=*``, what OHIF asks), one at a time over one
connection; medians of the rounds' p50 and this process's CPU time per request. Nothing is
asserted.

    .venv/bin/python benchmarks/frame_retrieval.py [--frames 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import requests
from pydicom.encaps import encapsulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import load_settings  # noqa: E402
from server.app import HttpServer, create_app  # noqa: E402
from storage.archive import open_archive  # noqa: E402
from storage.ingest import Origin, ingest_file  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.server.dicomweb.test_wsi_frames import whole_slide_image  # noqa: E402

ACCEPT = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}


def slide_file(frames: int, path: Path) -> tuple[str, int]:
    """A slide of ``frames`` 8-byte frames written to ``path``; (its instance URL path, frames)."""
    tiles = [b"\xff\xd8" + struct.pack("<L", i) + b"\xff\xd9" for i in range(frames)]
    ds = whole_slide_image(tiles)
    ds.PixelData = encapsulate(tiles, has_bot=False)
    ds.save_as(path, enforce_file_format=True)
    return (
        f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/",
        frames,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hilum-frames-") as folder:
        work = Path(folder)
        settings = load_settings(None, server={"data_dir": work / "data"})
        archive = open_archive(settings, migrate=True)
        slides = {}
        for frames in (args.frames, 256):
            path_of, count = slide_file(frames, work / f"{frames}.dcm")
            ingest_file(archive, work / f"{frames}.dcm", Origin())
            slides[f"{count} frames"] = (path_of, count)
        server = HttpServer(create_app(settings, archive), "127.0.0.1", free_port())
        server.start()
        base = f"http://127.0.0.1:{server.port}/dicomweb"
        p50s: dict[str, list[float]] = {name: [] for name in slides}
        cpus: dict[str, list[float]] = {name: [] for name in slides}
        rng = random.Random(0)
        try:
            with requests.Session() as session:
                for path_of, _ in slides.values():  # warm-up: caches, connection
                    session.get(base + path_of + "1", headers=ACCEPT, timeout=60).raise_for_status()
                for _ in range(args.rounds):
                    for name, (path_of, count) in slides.items():
                        samples = []
                        cpu = time.process_time()
                        for _ in range(args.requests):
                            url = base + path_of + str(rng.randint(1, count))
                            start = time.perf_counter()
                            response = session.get(url, headers=ACCEPT, timeout=60)
                            samples.append((time.perf_counter() - start) * 1000)
                            response.raise_for_status()
                        cpus[name].append((time.process_time() - cpu) / args.requests * 1000)
                        p50s[name].append(statistics.median(samples))
        finally:
            server.stop()
            archive.close()
    print(f"\nload average {os.getloadavg()[0]:.1f}; {args.requests} requests per slide per round")
    print("slide | p50 ms, median of rounds (range) | CPU ms per request (server and client)")
    for name in slides:
        p, c = p50s[name], cpus[name]
        print(f"{name:>14} | {statistics.median(p):6.2f} ({min(p):.2f}-{max(p):.2f}) | "
              f"{statistics.median(c):6.2f} ({min(c):.2f}-{max(c):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
