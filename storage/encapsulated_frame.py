"""What a compressed frame's own header declares (PS3.5 8.2: the JPEG, JPEG-LS, JPEG 2000
and HTJ2K codestreams, and the RLE header, inside encapsulated Pixel Data), read before a
decoder sees the frame.

A decoder allocates what the codestream declares, not what the data set's Rows and Columns
say: a frame whose header claims 65535 x 65535 would be decoded into gigabytes even under the
``[limits]`` that the data set's own geometry passed. So every decode compares the two first,
and a disagreement is an error, not a decode.
"""

from __future__ import annotations

import struct

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, RLELossless

from storage.dicom_file import integer_value
from storage.errors import InvalidInstance

# ISO/IEC 10918-1 B.1.1.3: start-of-frame markers (SOF0..SOF15 but DHT, JPG, DAC); ISO/IEC
# 14495-1 (JPEG-LS) SOF55.
_SOF = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}) | {0xF7}
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: no length
_JPEG_SEARCH = 1 << 20  # APPn segments (ICC profiles) may come before the SOF
_J2K_SIZ = b"\xff\x4f\xff\x51"  # ISO/IEC 15444-1 A.5: SOC, then SIZ
_J2K_SEARCH = 4096  # a JP2 wrapper's boxes before the codestream
_RLE_HEADER = struct.Struct("<16L")  # PS3.5 G.5


def declared_size(transfer_syntax: str, frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) that the frame's codestream header declares; None when the
    syntax carries no such header (native, RLE, video) or it does not declare them."""
    uid = UID(transfer_syntax)
    if not uid.is_encapsulated:
        return None
    if frame[:2] == b"\xff\xd8":
        return _jpeg(frame)
    at = frame.find(_J2K_SIZ, 0, _J2K_SEARCH)
    if at >= 0:
        return _j2k(frame, at + 4)
    return None


def check_frame_header(
    transfer_syntax: str,
    frame: bytes,
    rows: int,
    columns: int,
    samples_per_pixel: int,
    bits_allocated: int = 8,
) -> None:
    """Refuse a frame whose codestream declares another size than the data set, or whose RLE
    header another number of segments, or segments outside the frame."""
    if transfer_syntax == RLELossless:
        _check_rle_header(frame, samples_per_pixel, bits_allocated)
        return
    declared = declared_size(transfer_syntax, frame)
    if declared is None:
        return
    frame_rows, frame_columns, components = declared
    if (
        (frame_rows and frame_rows != rows)
        or frame_columns != columns
        or (components > samples_per_pixel)
    ):
        raise InvalidInstance(
            f"the frame's codestream declares {frame_rows} x {frame_columns} x {components}, "
            f"the data set {rows} x {columns} x {samples_per_pixel} (PS3.5 8.2)"
        )


def check_data_set_frames(dataset: Dataset) -> None:
    """:func:`check_frame_header` of every frame of a parsed data set's encapsulated Pixel
    Data, before a decode of the whole data set (transcoding, the AI worker)."""
    syntax = UID(dataset.file_meta.TransferSyntaxUID)
    if not syntax.is_encapsulated or "PixelData" not in dataset:
        return
    rows, columns = integer_value(dataset, "Rows") or 0, integer_value(dataset, "Columns") or 0
    samples = integer_value(dataset, "SamplesPerPixel") or 1
    bits = integer_value(dataset, "BitsAllocated") or 8
    frames = max(1, integer_value(dataset, "NumberOfFrames") or 1)
    for frame in generate_frames(dataset.PixelData, number_of_frames=frames):
        check_frame_header(syntax, frame, rows, columns, samples, bits)


def _check_rle_header(frame: bytes, samples_per_pixel: int, bits_allocated: int) -> None:
    # PS3.5 G.2: one segment per byte of each sample, most significant first; G.5: a header of
    # 16 unsigned longs, the number of segments (at most 15), then each segment's offset from
    # the start of the header (the first is 64).
    expected = samples_per_pixel * -(-bits_allocated // 8)
    if len(frame) < _RLE_HEADER.size:
        raise InvalidInstance(f"the RLE frame has {len(frame)} bytes, less than its header")
    count, *offsets = _RLE_HEADER.unpack_from(frame)
    if count != expected:
        raise InvalidInstance(
            f"the frame's RLE header declares {count} segments, the data set {expected} "
            f"({samples_per_pixel} samples of {bits_allocated} bits; PS3.5 G.2)"
        )
    used = offsets[:count]
    if (
        used[0] != _RLE_HEADER.size
        or any(later <= earlier for earlier, later in zip(used, used[1:], strict=False))
        or used[-1] >= len(frame)
    ):
        raise InvalidInstance(
            "the frame's RLE header gives segment offsets out of order or outside the frame "
            "(PS3.5 G.5)"
        )


def _jpeg(frame: bytes) -> tuple[int, int, int] | None:
    at, end = 2, min(len(frame), _JPEG_SEARCH)
    while at + 4 <= end:
        if frame[at] != 0xFF:
            return None  # not at a marker: entropy-coded data or garbage
        marker = frame[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        (length,) = struct.unpack(">H", frame[at + 2 : at + 4])
        if marker in _SOF:
            if at + 10 > len(frame):
                return None
            rows, columns, components = struct.unpack(">HHB", frame[at + 5 : at + 10])
            return rows, columns, components
        if marker in (0xDA, 0xD9):  # start of scan, end of image: no frame header came
            return None
        at += 2 + length
    return None


def _j2k(frame: bytes, at: int) -> tuple[int, int, int] | None:
    # Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz
    if at + 38 > len(frame):
        return None
    _lsiz, _rsiz, x, y, x0, y0, _xt, _yt, _xt0, _yt0, components = struct.unpack(
        ">HHIIIIIIIIH", frame[at : at + 38]
    )
    return max(0, y - y0), max(0, x - x0), components
