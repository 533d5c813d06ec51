"""Hostile Part 10 files, built byte by byte where pydicom would refuse to write them (or would
recurse, or would need the whole inflated content in memory): the corpus of issue 17."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)


def _header(sop_class: str = CTImageStorage, **elements: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "HOSTILE"
    ds.Modality = "OT"
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _meta_bytes(ds: Dataset, transfer_syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


def _explicit_le(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR Little Endian element with a 4-byte length (OB, SQ, UN, ...)."""
    return struct.pack("<HH2sHL", group, element, vr, 0, len(value)) + value


def nested_sequences(path: Path, depth: int) -> Path:
    """Content Sequences (0040,A730) nested ``depth`` deep, undefined lengths throughout."""
    ds = _header()
    opening = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    path.write_bytes(
        _meta_bytes(ds, ExplicitVRLittleEndian)
        + _explicit_le(ds)
        + opening * depth
        + closing * depth
    )
    return path


def many_elements(path: Path, count: int) -> Path:
    """``count`` private SH elements of two bytes, 256 per odd group from (0021,xx00) on."""
    ds = _header()
    elements = b"".join(
        struct.pack("<HH2sH", 0x0021 + 2 * (n // 256), 0x1000 + n % 256, b"SH", 2) + b"AB"
        for n in range(count)
    )
    path.write_bytes(_meta_bytes(ds, ExplicitVRLittleEndian) + _explicit_le(ds) + elements)
    return path


def many_items(path: Path, count: int) -> Path:
    """One Content Sequence holding ``count`` empty items (8 bytes each in the file, a data
    set each in pydicom)."""
    ds = _header()
    items = struct.pack("<HHL", 0xFFFE, 0xE000, 0) * count
    sequence = (
        struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
        + items
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )
    path.write_bytes(_meta_bytes(ds, ExplicitVRLittleEndian) + _explicit_le(ds) + sequence)
    return path


def deflate_bomb(path: Path, inflated_bytes: int) -> Path:
    """A Deflated Explicit VR Little Endian file whose data set inflates to about
    ``inflated_bytes``: a zero-filled Encapsulated Document (0042,0011) compressed as it is
    generated, 1 MiB at a time, so the inflated content never exists in memory."""
    ds = _header()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = _explicit_le(ds)
    length = inflated_bytes - len(head) - 12
    length -= length % 2
    chunk = bytes(1 << 20)
    with open(path, "wb") as out:
        out.write(_meta_bytes(ds, DeflatedExplicitVRLittleEndian))
        out.write(
            compressor.compress(head + struct.pack("<HH2sHL", 0x0042, 0x0011, b"OB", 0, length))
        )
        left = length
        while left:
            step = min(left, len(chunk))
            out.write(compressor.compress(chunk[:step]))
            left -= step
        out.write(compressor.flush())
    return path


def small_deflated(path: Path) -> Path:
    """A valid deflated instance (a small Encapsulated Document), as a control."""
    ds = _header()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = _explicit_le(ds) + _element(0x0042, 0x0011, b"OB", b"%PDF" * 256)
    path.write_bytes(
        _meta_bytes(ds, DeflatedExplicitVRLittleEndian)
        + compressor.compress(body)
        + compressor.flush()
    )
    return path


def _jpeg_header(rows: int, columns: int, components: int) -> bytes:
    """SOI, a baseline SOF0 claiming ``rows`` x ``columns``, EOI: no scan at all."""
    sof = struct.pack(">BHHB", 8, rows, columns, components) + b"".join(
        bytes([n + 1, 0x11, 0]) for n in range(components)
    )
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def jpeg_claiming(
    path: Path, rows: int, columns: int, frames: int, header: tuple[int, int] | None = None
) -> Path:
    """JPEG Baseline, RGB, ``frames`` frames of ``rows`` x ``columns`` as declared by the data
    set, and by each frame's SOF0 header unless ``header`` says otherwise; no scan."""
    ds = _header(
        SecondaryCaptureImageStorage,
        Rows=rows,
        Columns=columns,
        SamplesPerPixel=3,
        PhotometricInterpretation="YBR_FULL_422",
        PlanarConfiguration=0,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        PixelRepresentation=0,
        NumberOfFrames=frames,
    )
    frame = _jpeg_header(*(header or (rows, columns)), 3)
    frame += b"\x00" * (len(frame) % 2)
    items = struct.pack("<HHL", 0xFFFE, 0xE000, 0) + b"".join(
        struct.pack("<HHL", 0xFFFE, 0xE000, len(frame)) + frame for _ in range(frames)
    )
    pixel_data = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + items
    pixel_data += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    path.write_bytes(_meta_bytes(ds, JPEGBaseline8Bit) + _explicit_le(ds) + pixel_data)
    return path


def zero_geometry(path: Path, frames: int) -> Path:
    """Rows = Columns = 0 and ``frames`` frames, with a few bytes of native Pixel Data."""
    ds = _header(
        Rows=0,
        Columns=0,
        SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2",
        BitsAllocated=16,
        BitsStored=16,
        HighBit=15,
        PixelRepresentation=0,
        NumberOfFrames=frames,
    )
    pixel_data = _element(0x7FE0, 0x0010, b"OW", b"\x00" * 16)
    path.write_bytes(_meta_bytes(ds, ExplicitVRLittleEndian) + _explicit_le(ds) + pixel_data)
    return path


def frames_beyond_pixel_data(path: Path, frames: int) -> Path:
    """A 16 x 16 native image declaring ``frames`` frames with the bytes of one."""
    ds = _header(
        Rows=16,
        Columns=16,
        SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2",
        BitsAllocated=16,
        BitsStored=16,
        HighBit=15,
        PixelRepresentation=0,
        NumberOfFrames=frames,
    )
    pixel_data = _element(0x7FE0, 0x0010, b"OW", b"\x00" * 512)
    path.write_bytes(_meta_bytes(ds, ExplicitVRLittleEndian) + _explicit_le(ds) + pixel_data)
    return path


def _rle_zero_row(columns: int) -> bytes:
    """One row of ``columns`` zero bytes, PackBits-encoded (PS3.5 G.3.1: a replicate run of n
    bytes is the byte 257 - n, then the value; at most 128 a run, never across rows)."""
    full, rest = divmod(columns, 128)
    return b"\x81\x00" * full + (bytes([257 - rest, 0]) if rest > 1 else b"\x00\x00" * rest)


def rle_zeros(path: Path, rows: int, columns: int, **elements: object) -> Path:
    """A CT image of ``rows`` x ``columns`` 16-bit zeros in RLE Lossless: a valid frame, within
    the default ``[limits]``, a few bytes a row stored and 2 bytes a pixel decoded (16000 x
    16000: 8 MB stored, 488 MiB decoded, gigabytes rendered)."""
    ds = _header(
        Modality="CT",
        Rows=rows,
        Columns=columns,
        SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2",
        BitsAllocated=16,
        BitsStored=16,
        HighBit=15,
        PixelRepresentation=0,
        RescaleIntercept=0,
        RescaleSlope=1,
        InstanceNumber=1,
        **elements,
    )
    segment = _rle_zero_row(columns) * rows
    segment += b"\x00" * (len(segment) % 2)
    # PS3.5 G.5: two segments (high bytes, low bytes), the first at 64.
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13))
    frame = header + segment + segment
    items = struct.pack("<HHL", 0xFFFE, 0xE000, 0) + struct.pack("<HHL", 0xFFFE, 0xE000, len(frame))
    pixel_data = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + items + frame
    pixel_data += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    path.write_bytes(_meta_bytes(ds, RLELossless) + _explicit_le(ds) + pixel_data)
    return path
