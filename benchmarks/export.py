"""What de-identification costs: `hilum export` of one CT study as stored (A) against
de-identified (B), in interleaved rounds A B A B on the embedded default (SQLite + files).

    .venv/bin/python -m benchmarks.export [--slices 64] [--size 256] [--rounds 5]

Prints per round the wall time, and at the end the medians and ranges of instances per second
and the CPU milliseconds per instance of each, and the ratio B / A.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from config import load_settings
from inference.phantoms import synthetic_ct_series
from storage.archive import open_archive
from storage.deidentify import Deidentifier
from storage.export import export_studies
from storage.ingest import Origin, ingest_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hilum-bench-export-"))
    try:
        settings = load_settings(None, server={"data_dir": work / "data"})
        archive = open_archive(settings, migrate=True)
        datasets, _ = synthetic_ct_series(7, slices=args.slices, size=args.size)
        for index, ds in enumerate(datasets):
            path = work / f"{index}.dcm"
            ds.save_as(path, enforce_file_format=True)
            ingest_file(archive, path, Origin(calling_ae_title="BENCH"))
            path.unlink()
        study = datasets[0].StudyInstanceUID
        deidentifier = Deidentifier("bench", b"benchmark-secret-0123456789")
        samples: dict[str, list[tuple[float, float]]] = {"as stored": [], "de-identified": []}
        for round_ in range(args.rounds):
            for name, with_deid in (("as stored", None), ("de-identified", deidentifier)):
                out = work / f"out-{round_}-{name}"
                wall, cpu = time.perf_counter(), time.process_time()
                summary = export_studies(archive, [study], out, deidentifier=with_deid)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                assert summary.instances == args.slices
                samples[name].append((wall, cpu))
                print(f"round {round_ + 1} {name:>13}: {wall:6.3f} s", flush=True)
                shutil.rmtree(out)
        archive.close()
        print(f"\n{args.slices} CT slices of {args.size}x{args.size}, {args.rounds} rounds")
        medians = {}
        for name, values in samples.items():
            rates = [args.slices / wall for wall, _ in values]
            cpu_ms = [1000 * cpu / args.slices for _, cpu in values]
            medians[name] = statistics.median(rates)
            print(
                f"{name:>13}: {medians[name]:7.0f} instances/s (range {min(rates):.0f}-"
                f"{max(rates):.0f}), CPU {statistics.median(cpu_ms):.2f} ms/instance"
            )
        ratio = medians["as stored"] / medians["de-identified"]
        print(f"de-identified export takes {ratio:.1f}x the time of the export as stored")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
