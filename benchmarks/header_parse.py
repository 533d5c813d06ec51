"""What parsing a received file's header costs: ``storage.header_elements.read_header`` (Hilum's
walk of the raw elements, what ingest runs) against pydicom's ``dcmread(fp,
stop_before_pixels=True)`` (what it ran before, and still runs for the files the walk leaves to
it), on the same files, in interleaved blocks (A B A B ...), and the whole
``read_instance_header`` (the parse, the checks, the frame table) with the walk.

The files are ``benchmarks/ingest.py``'s synthetic 512x512 CT slices (explicit VR little
endian, about 60 elements each) and, with ``--files``, any others (say a folder of real ones).
CPU time of this process, µs per file, median of the blocks (range).

    .venv/bin/python benchmarks/header_parse.py [--instances 100] [--blocks 7] [--files DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import write_series  # noqa: E402 (benchmarks/ingest.py)

from storage.dicom_file import read_instance_header  # noqa: E402
from storage.header_elements import read_header  # noqa: E402


def walk(path: Path) -> None:
    with open(path, "rb") as fp:
        if read_header(fp) is None:
            raise SystemExit(f"{path}: not walked (pydicom's turn); leave it out")


def pydicom_read(path: Path) -> None:
    with open(path, "rb") as fp:
        pydicom.dcmread(fp, stop_before_pixels=True)


def whole(path: Path) -> None:
    read_instance_header(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100, help="synthetic CT slices")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--files", type=Path, help="a folder of Part 10 files to parse too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hilum-header-parse-") as work:
        files = write_series(Path(work) / "ct", args.instances)
        if args.files:
            files += sorted(p for p in args.files.rglob("*") if p.is_file())
        ways: dict[str, Callable[[Path], None]] = {
            "read_header (the walk)": walk,
            "dcmread(stop_before_pixels)": pydicom_read,
            "read_instance_header (all of it)": whole,
        }
        for parse in ways.values():  # warm: imports, caches
            for path in files[:10]:
                parse(path)
        spent: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.blocks):
            for name, parse in ways.items():
                start = time.process_time()
                for path in files:
                    parse(path)
                spent[name].append((time.process_time() - start) / len(files) * 1e6)
    print(f"{len(files)} files, {args.blocks} interleaved blocks; CPU µs per file")
    print("| parse | median (range) |")
    print("|---|---|")
    for name, values in spent.items():
        print(f"| {name} | {statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f}) |")
    walk_, pydicom_ = spent["read_header (the walk)"], spent["dcmread(stop_before_pixels)"]
    ratios = [p / w for w, p in zip(walk_, pydicom_, strict=True)]
    print(
        f"dcmread / walk, per block: {statistics.median(ratios):.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
