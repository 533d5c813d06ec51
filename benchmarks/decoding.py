"""What decoding in a bounded place costs (issue 17: under 2 % of normal rendering/transcoding).

Two apps on one archive (SQLite index + files under a temporary data dir), served by
``server.app.HttpServer`` (cheroot) in this process as ``hilum serve`` serves them: one decodes
in its decoder processes (``[limits] decoder_processes = 2``, the default, with the default
memory and time budgets), the other in the requesting thread (``decoder_processes = 0``, as
before issue 17). The same requests go to both, in interleaved rounds (A B A B …), one
keep-alive connection each:

* WADO-RS rendered, a native 512x512 16-bit CT slice, ``image/jpeg``;
* WADO-RS rendered, the same slice stored in RLE Lossless, ``/frames/1/rendered``, ``image/png``;
* WADO-RS frame of the RLE slice as ``application/octet-stream`` (decoded);
* WADO-RS instance of the RLE slice in Explicit VR Little Endian (transcoded; C-MOVE / C-GET
  transcode with the same function, ``server.transcoding.transcoded_instance``).

Reported per request kind: p50 of each, the range of the rounds' p50s, the median over the
rounds of (pool round p50 − the in-process round p50 just before it) as a share of the in-process
p50, and CPU per request (this process — client and server — plus the decoder processes).
Figures go to stdout, progress to stderr; nothing is asserted.

    .venv/bin/python benchmarks/decoding.py [--rounds N] [--requests N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from config import load_settings  # noqa: E402
from server.app import HttpServer, create_app  # noqa: E402
from storage.archive import open_archive  # noqa: E402
from storage.decoder_pool import DecoderPool  # noqa: E402
from storage.ingest import ingest_file  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.factories import ct_instance, write_part10  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's living children (the decoder processes)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # ppid
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        settings = load_settings(None, server={"data_dir": work / "data"})
        archive = open_archive(settings, migrate=True)
        native = ct_instance(size=512)
        rle = ct_instance(size=512, seed=1)
        rle.compress(RLELossless, generate_instance_uid=False)
        for name, ds in (("native", native), ("rle", rle)):
            ingest_file(archive, write_part10(ds, work / f"{name}.dcm"))
        in_process = dataclasses.replace(
            archive, decoders=DecoderPool(0, settings.limits.decode_memory_mb, 1.0)
        )
        servers = {
            "in process": HttpServer(create_app(settings, in_process), "127.0.0.1", free_port()),
            "decoder pool": HttpServer(create_app(settings, archive), "127.0.0.1", free_port()),
        }
        for server in servers.values():
            server.start()

        def path(ds) -> str:  # type: ignore[no-untyped-def]
            return (
                f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}"
            )

        cases = {
            "rendered, native 512x512 CT, JPEG": (path(native) + "/rendered", "image/jpeg"),
            "rendered frame, RLE 512x512 CT, PNG": (
                path(rle) + "/frames/1/rendered", "image/png"),
            "frame, RLE, as octet-stream (decoded)": (
                path(rle) + "/frames/1", 'multipart/related; type="application/octet-stream"'),
            "instance, RLE, in Explicit VR LE (transcoded)": (
                path(rle), 'multipart/related; type="application/dicom"; '
                f"transfer-syntax={ExplicitVRLittleEndian}"),
        }  # fmt: skip
        print(
            f"\nDecoding in a bounded place: {args.rounds} interleaved rounds of "
            f"{args.requests} requests each (in process, then decoder pool), SQLite + files, "
            f"load average {os.getloadavg()[0]:.1f} at the start"
        )
        print(
            "| request | p50 in process / pool ms | added (median of paired round "
            "differences) ms, % | round p50 ranges in process / pool ms | CPU per request in "
            "process / pool ms (with the decoders') |\n|---|---|---|---|---|"
        )
        try:
            for name, (resource, accept) in cases.items():
                log(f"{name} ...")
                samples: dict[str, list[float]] = {k: [] for k in servers}
                round_p50s: dict[str, list[float]] = {k: [] for k in servers}
                cpu = dict.fromkeys(servers, 0.0)
                sessions = {k: requests.Session() for k in servers}
                for label, server in servers.items():
                    for _ in range(10):  # warm: connections, the decoder processes' start
                        url = f"http://127.0.0.1:{server.port}{resource}"
                        sessions[label].get(url, headers={"Accept": accept}).raise_for_status()
                for _ in range(args.rounds):
                    for label, server in servers.items():
                        url = f"http://127.0.0.1:{server.port}{resource}"
                        this_round = []
                        cpu_before = time.process_time() + children_cpu_s()
                        for _ in range(args.requests):
                            started = time.perf_counter()
                            response = sessions[label].get(url, headers={"Accept": accept})
                            _ = response.content
                            this_round.append(time.perf_counter() - started)
                            response.raise_for_status()
                        cpu[label] += time.process_time() + children_cpu_s() - cpu_before
                        samples[label] += this_round
                        round_p50s[label].append(statistics.median(this_round) * 1000)
                for session in sessions.values():
                    session.close()
                a, b = "in process", "decoder pool"
                p50 = {k: statistics.median(v) * 1000 for k, v in samples.items()}
                added = statistics.median(
                    y - x for x, y in zip(round_p50s[a], round_p50s[b], strict=True)
                )
                total = args.rounds * args.requests
                ranges = " / ".join(
                    f"{min(round_p50s[k]):.2f}-{max(round_p50s[k]):.2f}" for k in (a, b)
                )
                print(
                    f"| {name} | {p50[a]:.2f} / {p50[b]:.2f} | {added:+.2f}, "
                    f"{added / p50[a] * 100:+.1f} % | {ranges} | "
                    f"{cpu[a] / total * 1000:.2f} / {cpu[b] / total * 1000:.2f} |",
                    flush=True,
                )
        finally:
            for server in servers.values():
                server.stop()
            archive.close()


if __name__ == "__main__":
    main()
