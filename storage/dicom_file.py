"""Read what the index needs from a stored DICOM file without decoding its pixel data.

The header is parsed up to the Pixel Data element; the frames are located by reading element
and item headers only (PS3.5 A.4 for encapsulated pixel data), so a multi-gigabyte whole-slide
image costs a few kilobytes of reads.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from storage.errors import InvalidInstance

# PS3.5 9.1: components of digits without leading zeros, separated by dots, at most 64 chars.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
PIXEL_DATA = 0x7FE00010
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD
# VRs whose explicit-VR element header has a 2-byte reserved field and a 4-byte length.
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
BULK_DATA_THRESHOLD = 1024
# Frame start markers, for encapsulated data without an offset table (JPEG SOI, J2K SOC).
_FRAME_START_MARKERS = (b"\xff\xd8", b"\xff\x4f")

FrameRanges = list[list[list[int]]]


@dataclass(frozen=True)
class InstanceHeader:
    """What ingest learns from one file: the header data set and where each frame lies."""

    dataset: Dataset
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    number_of_frames: int
    frame_ranges: FrameRanges | None
    has_pixel_data: bool


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


def is_storage_sop_class(uid: str) -> bool:
    return uid_to_service_class(uid) is StorageServiceClass


def read_instance_header(path: Path) -> InstanceHeader:
    """Parse and validate a DICOM Part 10 file; raise :class:`InvalidInstance` with the reason."""
    file_size = path.stat().st_size
    with open(path, "rb") as fp:
        try:
            dataset = pydicom.dcmread(fp, stop_before_pixels=True)
            pixel_data_at = fp.tell()
        except InvalidDicomError as exc:
            raise InvalidInstance(f"not a DICOM Part 10 file: {exc}") from exc
        except (EOFError, ValueError, struct.error, OSError, KeyError, TypeError) as exc:
            raise InvalidInstance(f"cannot parse the data set: {exc}") from exc

        meta = dataset.file_meta
        transfer_syntax = meta.get("TransferSyntaxUID")
        if not is_valid_uid(transfer_syntax):
            raise InvalidInstance("the file meta information lacks a valid Transfer Syntax UID")
        uids = {
            keyword: dataset.get(keyword)
            for keyword in (
                "SOPClassUID",
                "SOPInstanceUID",
                "StudyInstanceUID",
                "SeriesInstanceUID",
            )
        }
        for keyword, value in uids.items():
            if value is None or value == "":
                raise InvalidInstance(f"the data set lacks {keyword}")
            if not is_valid_uid(str(value)):
                raise InvalidInstance(f"{keyword} {str(value)[:80]!r} is not a valid UID")
        sop_class = str(uids["SOPClassUID"])

        frames = _number_of_frames(dataset)
        has_pixel_data = (
            pixel_data_at < file_size and transfer_syntax != DeflatedExplicitVRLittleEndian
        )
        frame_ranges = None
        if has_pixel_data:
            ts = UID(transfer_syntax)
            fp.seek(pixel_data_at)
            frame_ranges = _locate_frames(fp, dataset, ts, frames, file_size)
            has_pixel_data = frame_ranges is not None or ts.is_encapsulated

    return InstanceHeader(
        dataset=dataset,
        transfer_syntax_uid=str(transfer_syntax),
        sop_class_uid=sop_class,
        sop_instance_uid=str(uids["SOPInstanceUID"]),
        study_instance_uid=str(uids["StudyInstanceUID"]),
        series_instance_uid=str(uids["SeriesInstanceUID"]),
        number_of_frames=frames,
        frame_ranges=frame_ranges,
        has_pixel_data=has_pixel_data,
    )


def _number_of_frames(dataset: Dataset) -> int:
    try:
        return max(1, int(dataset.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _locate_frames(
    fp: BinaryIO, dataset: Dataset, ts: UID, frames: int, file_size: int
) -> FrameRanges | None:
    endian = "<" if ts.is_little_endian else ">"
    header = fp.read(8)
    if len(header) < 8:
        raise InvalidInstance("the data set ends inside the Pixel Data element header")
    group, element = struct.unpack(f"{endian}HH", header[:4])
    if (group << 16 | element) != PIXEL_DATA:
        return None  # Float/Double Float Pixel Data: not framed by this index
    if ts.is_implicit_VR:
        (length,) = struct.unpack(f"{endian}L", header[4:8])
    elif header[4:6] in _LONG_VRS:
        (length,) = struct.unpack(f"{endian}L", fp.read(4))
    else:
        (length,) = struct.unpack(f"{endian}H", header[6:8])
    value_at = fp.tell()

    if length != 0xFFFFFFFF:
        if value_at + length > file_size:
            raise InvalidInstance(
                f"the data set is truncated: Pixel Data needs {length} bytes, "
                f"{file_size - value_at} remain"
            )
        return _native_frames(dataset, value_at, length, frames)
    return _encapsulated_frames(fp, dataset, frames, file_size)


def _native_frames(dataset: Dataset, value_at: int, length: int, frames: int) -> FrameRanges | None:
    try:
        bits = int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("SamplesPerPixel", 1))
        bits *= int(dataset.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return None
    if bits % 8:
        return None  # PS3.5 8.1.1: 1-bit frames need not start on a byte boundary
    frame_length = bits // 8
    if frame_length * frames > length:
        raise InvalidInstance(
            f"Pixel Data holds {length} bytes, {frames} frame(s) of {frame_length} need more"
        )
    return [[[value_at + i * frame_length, frame_length]] for i in range(frames)]


def _read_item(fp: BinaryIO, file_size: int) -> tuple[int, int, int]:
    """(tag, value offset, value length) of the item header at the current position."""
    raw = fp.read(8)
    if len(raw) < 8:
        raise InvalidInstance("the data set is truncated inside the encapsulated Pixel Data")
    tag_group, tag_element, length = struct.unpack("<HHL", raw)
    at = fp.tell()
    if (tag_group << 16 | tag_element) == _ITEM and (
        length == 0xFFFFFFFF or at + length > file_size
    ):
        raise InvalidInstance("the data set is truncated inside a Pixel Data fragment")
    return tag_group << 16 | tag_element, at, length


def _encapsulated_frames(
    fp: BinaryIO, dataset: Dataset, frames: int, file_size: int
) -> FrameRanges | None:
    # PS3.5 A.4: a Basic Offset Table item, then one item per fragment, then a delimiter.
    tag, at, length = _read_item(fp, file_size)
    if tag != _ITEM:
        raise InvalidInstance("encapsulated Pixel Data does not start with an offset table item")
    bot = list(struct.unpack(f"<{length // 4}L", fp.read(length))) if length else []
    first_fragment_at = fp.tell()
    fragments: list[tuple[int, int, int]] = []  # (item offset from first fragment, at, length)
    while True:
        tag, at, length = _read_item(fp, file_size)
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM:
            raise InvalidInstance(f"unexpected tag {tag:08X} inside encapsulated Pixel Data")
        fragments.append((at - 8 - first_fragment_at, at, length))
        fp.seek(at + length)

    if not fragments:
        raise InvalidInstance("encapsulated Pixel Data holds no fragment")
    if len(fragments) == frames:
        return [[[at, length]] for _, at, length in fragments]
    if frames == 1:
        return [[[at, length] for _, at, length in fragments]]
    starts: list[int]
    if len(bot) == frames:
        starts = [i for i, (offset, _, _) in enumerate(fragments) if offset in set(bot)]
    else:
        starts = []
        for i, (_, at, length) in enumerate(fragments):
            fp.seek(at)
            if length >= 2 and fp.read(2) in _FRAME_START_MARKERS:
                starts.append(i)
    if len(starts) != frames or starts[0] != 0:
        return None  # frames cannot be told apart without decoding; WADO-RS decodes instead
    bounds = [*starts, len(fragments)]
    return [
        [[at, length] for _, at, length in fragments[bounds[i] : bounds[i + 1]]]
        for i in range(frames)
    ]


def metadata_json(dataset: Dataset, has_pixel_data: bool) -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) of the header, with bulk data replaced by BulkDataURIs.

    The URIs are relative (``bulkdata/<tag>``); DICOMweb resolves them against the instance URL.
    """

    def bulk_data_uri(element: DataElement) -> str:
        return f"bulkdata/{element.tag:08X}"

    encoded = dataset.to_json_dict(
        bulk_data_threshold=BULK_DATA_THRESHOLD,
        bulk_data_element_handler=bulk_data_uri,
        suppress_invalid_tags=True,
    )
    if has_pixel_data:
        # PS3.5 A.4: encapsulated Pixel Data is OB; native is OW above 8 bits allocated.
        encapsulated = UID(dataset.file_meta.TransferSyntaxUID).is_encapsulated
        vr = "OW" if not encapsulated and int(dataset.get("BitsAllocated", 8)) > 8 else "OB"
        encoded[f"{PIXEL_DATA:08X}"] = {"vr": vr, "BulkDataURI": f"bulkdata/{PIXEL_DATA:08X}"}
    return _without_nul(encoded)


def _without_nul(value: Any) -> Any:
    """PostgreSQL's JSONB rejects U+0000, which padded DICOM strings sometimes carry."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {k: _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value
