"""What the ``[limits]`` checks cost at ingest (issue 17: under 2 % of ingest time).

What is measured, in this process, on the embedded default (SQLite index + files under a
temporary data dir), for synthetic CT instances (512x512, 16-bit, explicit VR little endian;
``--instances``, default 300, each a new instance):

* ``ingest_file`` per instance, the limits on (they cannot be switched off): the whole ingest,
  parse, checks, hash, durable blob, index commit;
* the checks alone on the same files, interleaved with the ingests: the structure pass over
  the element headers (``storage.data_set_structure.part10_structure``, on the file ingest has
  open already: its ``fstat`` and the read of the header's bytes, not the ``open``) and the
  size check from the declared geometry (``storage.limits.check_decoded_size``), once first on
  each file (as ingest runs them) and once after pydicom's parse of it (warm);
* for scale, pydicom's header parse alone (``dcmread(stop_before_pixels=True)``), which
  ingest did before the limits too.

Reported: median and p95 microseconds of each, and the checks' medians as a share of the
median ingest. Figures go to stdout, progress to stderr; nothing is asserted.

    .venv/bin/python benchmarks/ingest_limits.py [--instances N]
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

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from config import load_settings  # noqa: E402
from config.settings import LimitsSettings  # noqa: E402
from storage.archive import open_archive  # noqa: E402
from storage.data_set_structure import part10_structure  # noqa: E402
from storage.ingest import ingest_file  # noqa: E402
from storage.limits import check_decoded_size  # noqa: E402
from tests.factories import ct_instance, write_part10  # noqa: E402


def _checks(path: Path, limits: LimitsSettings) -> float:
    """Seconds the checks take on ``path`` opened (``read_instance_header`` opens it once for
    the checks and pydicom's parse)."""
    with open(path, "rb") as fp:
        started = time.perf_counter()
        with part10_structure(fp, limits):
            pass
        check_decoded_size(512, 512, 1, 16, 1, limits)
        return time.perf_counter() - started


def _micros(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return f"median {statistics.median(ordered) * 1e6:8.1f} us   p95 {p95 * 1e6:8.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        settings = load_settings(None, server={"data_dir": root / "hilum-data"})
        archive = open_archive(settings, migrate=True)
        limits = archive.limits
        study, series = generate_uid(), generate_uid()
        print(f"writing {args.instances} instances", file=sys.stderr)
        files = [
            write_part10(ct_instance(study, series, size=512, seed=n), root / f"{n}.dcm")
            for n in range(args.instances)
        ]
        ingest, checks, checks_again, parse = [], [], [], []
        for n, path in enumerate(files):
            checks.append(_checks(path, limits))
            started = time.perf_counter()
            pydicom.dcmread(path, stop_before_pixels=True)
            parse.append(time.perf_counter() - started)
            checks_again.append(_checks(path, limits))
            started = time.perf_counter()
            ingest_file(archive, path)
            ingest.append(time.perf_counter() - started)
            if n % 50 == 0:
                print(f"  {n}/{len(files)}", file=sys.stderr)
        archive.close()
    print(f"ingest_file, limits on ({args.instances} x 512x512 CT, SQLite + files):")
    print(f"  whole ingest          {_micros(ingest)}")
    print(f"  limits checks, first  {_micros(checks)}")
    print(f"  limits checks, again  {_micros(checks_again)}")
    print(f"  pydicom header parse  {_micros(parse)}")
    for name, samples in (("first", checks), ("again", checks_again)):
        share = statistics.median(samples) / statistics.median(ingest) * 100
        print(f"  checks ({name}) / ingest, medians: {share:.2f} %")


if __name__ == "__main__":
    main()
