"""Memory per DIMSE association while C-STOREs stream in (issue 15: under 2 MiB per
association whatever the instance size, a 2 GB whole-slide image included).

A ``hilum dimse`` process on the embedded default (SQLite + files under a temporary folder), on
its own, receives VL Whole Slide Microscopy images (JPEG Baseline, one fragment per frame, every
frame the same real 512x512 JPEG tile) from Hilum's own requestor
(``server.dimse.negotiation.request_association``), which makes each data set as it sends it: no
file on the sending side, and the sender's memory is not the server's. The server's resident set
is read from ``/proc/PID/status``: its peak (VmHWM, reset before each step through
``/proc/PID/clear_refs``) over its resident set just before the step (after a warm-up C-STORE
that loaded everything a C-STORE needs).

1. ``--associations`` (default 1, 8, 32) associations at once, each sending one slide of
   ``--slide-mib`` MiB: (peak - before) / associations.
2. One slide of ``--large-gib`` GiB (default 2) on one association: peak - before.

``--tile`` (default 512) sets the tiles' side: 128 makes a 2 GiB slide of about 130 000 frames,
the number of frames of a real 2 GB slide of 256x256 tiles (whose JPEGs are smaller than these
tiles of random pixels).

Every C-STORE must be answered Success (0x0000) and stored at its full size; a step that is not
says so. Several rounds (``--rounds``): medians and ranges. Nothing is asserted.

    .venv/bin/python benchmarks/association_memory.py [--rounds 3] [--large-gib 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from pynetdicom.dsutils import encode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.processes import (  # noqa: E402
    accepts_tcp,
    environment,
    free_port,
    progress,
    running,
)
from server.dimse.commands import CommandField  # noqa: E402
from server.dimse.negotiation import request_association  # noqa: E402

HILUM = str(Path(sys.executable).parent / "hilum")
WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
TILE = 512
MAX_PDU = 16384  # DCMTK's default


def jpeg_tile(size: int = TILE) -> bytes:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    out = BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=90)
    tile = out.getvalue()
    return tile + b"\x00" * (len(tile) % 2)  # PS3.5 A.4: fragments of even length


class SlideStream:
    """A whole-slide image's data set (explicit VR little endian, encapsulated Pixel Data with an
    empty Basic Offset Table), made as it is read: ``frames`` items of ``tile``."""

    def __init__(self, tile: bytes, frames: int, side: int = TILE) -> None:
        self.sop_instance_uid = generate_uid()
        self.size = 0
        self._pieces = self._make(tile, frames, side)
        self._piece, self._offset = b"", 0

    def _make(self, tile: bytes, frames: int, side: int) -> Iterator[bytes]:
        ds = Dataset()
        ds.SOPClassUID = WSI
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientName, ds.PatientID, ds.Modality = "MEMORY^SLIDE", "MEM-1", "SM"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        ds.DimensionOrganizationType = "TILED_FULL"
        across = max(1, int(frames**0.5))
        ds.TotalPixelMatrixColumns = side * across
        ds.TotalPixelMatrixRows = side * -(-frames // across)
        ds.Rows = ds.Columns = side
        ds.NumberOfFrames = frames
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        header = encode(ds, False, True)
        assert header is not None
        yield header
        yield struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
        yield struct.pack("<HHI", 0xFFFE, 0xE000, 0)  # the Basic Offset Table, empty
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(tile)) + tile
        for _ in range(frames):
            yield item
        yield struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)

    def read(self, size: int) -> bytes:
        parts = []
        while size:
            if self._offset == len(self._piece):
                piece = next(self._pieces, None)
                if piece is None:
                    break
                self._piece, self._offset = piece, 0
            part = self._piece[self._offset : self._offset + size]
            self._offset += len(part)
            size -= len(part)
            parts.append(part)
        chunk = b"".join(parts)
        self.size += len(chunk)
        return chunk


def store_slide(port: int, tile: bytes, frames: int, side: int = TILE) -> tuple[int, int]:
    """C-STORE one slide; (status, bytes of the data set sent)."""
    assoc = request_association(
        "127.0.0.1", port, calling_ae_title="MEMSCU", called_ae_title="HILUM",
        contexts=[(WSI, [JPEGBaseline8Bit])], max_pdu_length=MAX_PDU, timeout=120,
    )  # fmt: skip
    try:
        (context,) = assoc.contexts.values()
        slide = SlideStream(tile, frames, side)
        command = {
            "AffectedSOPClassUID": WSI,
            "CommandField": CommandField.C_STORE_RQ,
            "MessageID": 1,
            "Priority": 0,
            "AffectedSOPInstanceUID": slide.sop_instance_uid,
        }
        assoc.send_message_stream(context, command, slide)  # type: ignore[arg-type]
        response = assoc.receive_message()
        assert response is not None and response.command.field == CommandField.C_STORE_RSP
        return int(response.command["Status"]), slide.size
    finally:
        assoc.release()


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """proc(5) clear_refs: "5" resets the peak resident set size (VmHWM) to the current one."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def step(
    pid: int, port: int, tile: bytes, associations: int, frames: int, side: int = TILE
) -> tuple[float, str]:
    """(peak growth in MiB per association, a note when a C-STORE did not succeed)."""
    time.sleep(0.5)  # let the previous step's threads end
    before = status_kib(pid, "VmRSS")
    reset_peak(pid)
    with ThreadPoolExecutor(associations) as pool:
        results = list(
            pool.map(lambda _: store_slide(port, tile, frames, side), range(associations))
        )
    peak = status_kib(pid, "VmHWM")
    failed = [f"{status:#06x}" for status, _ in results if status != 0x0000]
    return (peak - before) / 1024 / associations, (f"failed: {failed}" if failed else "")


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--slide-mib", type=int, default=64)
    parser.add_argument("--large-gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--tile", type=int, default=TILE, help="tile side in pixels: smaller, more frames"
    )
    args = parser.parse_args()
    tile = jpeg_tile(args.tile)
    item = len(tile) + 8
    slide_frames = max(1, (args.slide_mib << 20) // item)
    large_frames = max(1, int(args.large_gib * (1 << 30)) // item)
    progress(f"tile {len(tile)} bytes; slides of {slide_frames} and {large_frames} frames")

    with tempfile.TemporaryDirectory(prefix="hilum-memory-") as folder:
        work = Path(folder)
        port = free_port()
        env = {"HILUM_SERVER__DATA_DIR": str(work / "data"), "HILUM_DIMSE__PORT": str(port),
               "HILUM_DIMSE__MAX_ASSOCIATIONS": str(max(args.associations) + 4)}  # fmt: skip
        log = work / "dimse.log"
        subprocess.run([HILUM, "db", "upgrade"], env=environment(env), check=True,
                       capture_output=True, timeout=120)  # fmt: skip
        with running([HILUM, "dimse"], log, accepts_tcp(port), env) as process:
            status, _ = store_slide(
                port, tile, 4, args.tile
            )  # warm-up: every module a C-STORE needs
            assert status == 0, f"warm-up C-STORE: {status:#06x}"
            progress(f"idle resident set {status_kib(process.pid, 'VmRSS') / 1024:.1f} MiB")
            figures: dict[str, list[float]] = {}
            notes: list[str] = []
            for round_ in range(args.rounds):
                for n in args.associations:
                    growth, note = step(process.pid, port, tile, n, slide_frames, args.tile)
                    figures.setdefault(f"{n} x {args.slide_mib} MiB", []).append(growth)
                    notes += [f"round {round_ + 1}, {n} associations: {note}"] if note else []
                    progress(f"round {round_ + 1}: {n} x {args.slide_mib} MiB: {growth:.2f} MiB")
                if args.large_gib:
                    growth, note = step(process.pid, port, tile, 1, large_frames, args.tile)
                    figures.setdefault(f"1 x {args.large_gib:g} GiB", []).append(growth)
                    notes += [f"round {round_ + 1}, large slide: {note}"] if note else []
                    progress(f"round {round_ + 1}: 1 x {args.large_gib:g} GiB: {growth:.2f} MiB")
            rss = status_kib(process.pid, "VmRSS") / 1024
    print(f"\nload average {os.getloadavg()[0]:.1f}; server resident set at the end {rss:.1f} MiB")
    print("associations x slide | peak growth per association, MiB: median (range)")
    for name, values in figures.items():
        print(f"{name:>20} | {summary(values)}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
