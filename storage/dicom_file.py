"""Read what the index needs from a stored DICOM file without decoding its pixel data.

The header is parsed up to the Pixel Data element; the frames are located by reading element
and item headers only (PS3.5 A.4 for encapsulated pixel data), so a multi-gigabyte whole-slide
image costs a few kilobytes of reads.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from config.settings import LimitsSettings
from storage.data_set_structure import part10_structure
from storage.errors import InvalidInstance, StorageError
from storage.frame_table import EncapsulatedTableBuilder, native_frame_table
from storage.header_elements import read_header
from storage.limits import check_decoded_size, check_stored_size, refuse_too_complex

log = logging.getLogger(__name__)

# PS3.5 9.1: components of digits without leading zeros, separated by dots, at most 64 chars.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
PIXEL_DATA = 0x7FE00010
# Pixel Data, Float and Double Float Pixel Data: where a header-only read stops.
_PIXEL_TAGS = frozenset({PIXEL_DATA, 0x7FE00008, 0x7FE00009})
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD
# PS3.5 7.1.2, Table 7.1-1: explicit VRs with a 2-byte reserved field and a 4-byte length.
LONG_LENGTH_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
BULK_DATA_THRESHOLD = 1024
# Frame start markers, for encapsulated data without an offset table (JPEG SOI, J2K SOC).
_FRAME_START_MARKERS = (b"\xff\xd8", b"\xff\x4f")


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
    # Where each frame lies (storage.frame_table, packed); None when not range-readable.
    frame_table: bytes | memoryview | None
    has_pixel_data: bool


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


def is_storage_sop_class(uid: str) -> bool:
    return uid_to_service_class(uid) is StorageServiceClass


def read_instance_header(path: Path, limits: LimitsSettings | None = None) -> InstanceHeader:
    """Parse and validate a DICOM Part 10 file; raise :class:`InvalidInstance` with the reason,
    or :class:`InstanceTooLarge` past one of ``limits`` (the ``[limits]`` defaults when None),
    each checked before the work it bounds."""
    limits = limits or LimitsSettings()
    file_size = path.stat().st_size
    check_stored_size(file_size, limits)
    try:
        with open(path, "rb") as fp, part10_structure(fp, limits) as structure:
            fp.seek(0)
            if structure is not None and structure.inflated is not None:
                # The deflated data set, inflated once by the structure pass (pydicom would
                # inflate the whole file in memory first).
                dataset = read_dataset(
                    structure.inflated,
                    is_implicit_VR=False,
                    is_little_endian=True,
                    stop_when=_at_pixel_data,
                )
                dataset.file_meta = read_file_meta_info(path)
                pixel_data_at = file_size  # the stored bytes are deflated: no frame ranges
                has_pixel_element = structure.has_pixel_data_element
            else:
                # Hilum's own walk of the raw elements: the data set pydicom would read, for
                # the files it knows how to walk; pydicom's read for the others.
                walked = read_header(fp)
                if walked is not None:
                    dataset, pixel_data_at = walked
                else:
                    fp.seek(0)
                    dataset = pydicom.dcmread(fp, stop_before_pixels=True)
                    pixel_data_at = fp.tell()
                has_pixel_element = pixel_data_at < file_size
            header = _instance_header(
                fp, dataset, pixel_data_at, file_size, has_pixel_element, limits
            )
    except StorageError:
        raise
    except InvalidDicomError as exc:
        raise InvalidInstance(f"not a DICOM Part 10 file: {exc}") from exc
    except RecursionError:
        # What the structure pass let through and pydicom still could not parse (its
        # recursion per nesting level is deeper than the pass's count).
        refuse_too_complex(
            "the data set nests too deep to parse", "sequence_max_depth", limits.sequence_max_depth
        )
    except MemoryError:
        raise  # not the file's fault alone: the caller answers out of resources
    except Exception as exc:  # noqa: BLE001 - pydicom raises any kind on a malformed value
        raise InvalidInstance(f"cannot parse the data set: {type(exc).__name__}: {exc}") from exc
    return header


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in _PIXEL_TAGS


def _instance_header(
    fp: BinaryIO,
    dataset: Dataset,
    pixel_data_at: int,
    file_size: int,
    has_pixel_element: bool,
    limits: LimitsSettings,
) -> InstanceHeader:
    """Validate the parsed header and locate the frames, checking the declared pixel
    geometry against ``limits`` and the bytes present before any range is built."""
    meta = dataset.file_meta
    transfer_syntax = uid_value(meta, "TransferSyntaxUID")
    if transfer_syntax is None or not is_valid_uid(transfer_syntax):
        raise InvalidInstance("the file meta information lacks a valid Transfer Syntax UID")
    uids: dict[str, str] = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = uid_value(dataset, keyword)
        if not value:
            raise InvalidInstance(f"the data set lacks {keyword}")
        if not is_valid_uid(value):
            raise InvalidInstance(f"{keyword} {value[:80]!r} is not a valid UID")
        uids[keyword] = value

    frames = _number_of_frames(dataset)
    _check_pixel_geometry(dataset, frames, has_pixel_element, limits)
    has_pixel_data = pixel_data_at < file_size and transfer_syntax != DeflatedExplicitVRLittleEndian
    frame_table = None
    if has_pixel_data:
        ts = UID(transfer_syntax)
        fp.seek(pixel_data_at)
        frame_table = _locate_frames(fp, dataset, ts, frames, file_size, limits)
        has_pixel_data = frame_table is not None or ts.is_encapsulated

    return InstanceHeader(
        dataset=dataset,
        transfer_syntax_uid=str(transfer_syntax),
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        number_of_frames=frames,
        frame_table=frame_table,
        has_pixel_data=has_pixel_data,
    )


def uid_value(dataset: Dataset, keyword: str) -> str | None:
    """``str(dataset.get(keyword))`` of a top-level UI element (None when absent).

    Read from the raw bytes while the element is still raw: pydicom's conversion of one element
    costs more than its share of the whole parse, and ingest reads a dozen. PS3.5 6.2: a UI
    value may be padded with one trailing NUL; pydicom strips trailing NULs and spaces, then
    surrounding white space, which this does too. Anything else is left to pydicom.
    """
    tag = tag_for_keyword(keyword)
    assert tag is not None, f"{keyword} is not a DICOM keyword"
    raw = dataset.get_item(tag)
    if isinstance(raw, RawDataElement) and raw.VR in (None, "UI") and not raw.is_buffered:
        text = (raw.value or b"").decode("latin-1").rstrip("\x00 ")
        if "\\" not in text:
            return text.strip()
    value = dataset.get(keyword)
    return None if value is None else str(value)


def integer_value(dataset: Dataset, keyword: str) -> int | None:
    """The single value of a top-level US or IS element as an int; None when absent, empty or
    not a whole number. Read from the raw bytes while the element is still raw (see
    :func:`uid_value`); anything but a plain single value is left to pydicom."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, f"{keyword} is not a DICOM keyword"
    raw = dataset.get_item(tag)
    if isinstance(raw, RawDataElement) and raw.value and not raw.is_buffered:
        vr = raw.VR or dictionary_VR(tag)
        if vr == "US" and len(raw.value) == 2:
            return int(struct.unpack("<H" if raw.is_little_endian else ">H", raw.value)[0])
        if vr == "IS" and _IS.match(text := raw.value.decode("latin-1").rstrip("\x00 ")):
            return int(text)
    try:
        value = dataset.get(keyword)
        return None if value in (None, "") else int(value)
    except Exception:  # noqa: BLE001 - pydicom raises any kind on a malformed value
        return None


# The VRs whose values the raw read gives as pydicom's strings (a PN's are names).
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI",
                       "UR", "UT"})  # fmt: skip


def text_value(dataset: Dataset, keyword: str) -> str | None:
    """A top-level element's value as text: ``str`` of each value pydicom converts it to,
    joined by backslashes; None when absent. Read from the raw bytes while the element is
    still raw (see :func:`uid_value`) for the text VRs the DICOM JSON fast path reads as
    pydicom does; anything else is pydicom's (which raises what it raises)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, f"{keyword} is not a DICOM keyword"
    raw = dataset.get_item(tag)
    if isinstance(raw, RawDataElement):
        try:
            fast = _fast_element_json(raw)
        except (ValueError, struct.error):
            fast = None
        if fast is not None and fast["vr"] in _TEXT_VRS:
            return "\\".join(fast.get("Value", ()))
    value = dataset.get(keyword)
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _number_of_frames(dataset: Dataset) -> int:
    return max(1, integer_value(dataset, "NumberOfFrames") or 1)


def _check_pixel_geometry(
    dataset: Dataset, frames: int, has_pixel_element: bool, limits: LimitsSettings
) -> None:
    """PS3.3 C.7.6.3: the Image Pixel attributes declare the decoded size; refuse a geometry
    without pixels, then one over the limits, before any frame is located or decoded."""
    rows, columns = integer_value(dataset, "Rows"), integer_value(dataset, "Columns")
    if has_pixel_element and not (rows and columns):
        raise InvalidInstance(
            f"Pixel Data with Rows {rows} and Columns {columns}: the declared pixel geometry "
            "holds no pixel"
        )
    check_decoded_size(
        rows or 0,
        columns or 0,
        integer_value(dataset, "SamplesPerPixel") or 1,
        integer_value(dataset, "BitsAllocated") or 8,
        frames,
        limits,
    )


def _locate_frames(
    fp: BinaryIO, dataset: Dataset, ts: UID, frames: int, file_size: int, limits: LimitsSettings
) -> bytes | memoryview | None:
    """The packed frame table (:mod:`storage.frame_table`) of the Pixel Data element at the
    current position; None when its frames cannot be located by range."""
    endian = "<" if ts.is_little_endian else ">"
    header = fp.read(8)
    if len(header) < 8:
        raise InvalidInstance("the data set ends inside the Pixel Data element header")
    group, element = struct.unpack(f"{endian}HH", header[:4])
    if (group << 16 | element) != PIXEL_DATA:
        return None  # Float/Double Float Pixel Data: not framed by this index
    if ts.is_implicit_VR:
        (length,) = struct.unpack(f"{endian}L", header[4:8])
    elif header[4:6].decode("latin-1") in LONG_LENGTH_VRS:
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
    return _encapsulated_frames(fp, frames, file_size, limits)


def _native_frames(dataset: Dataset, value_at: int, length: int, frames: int) -> bytes | None:
    rows, columns, bits_allocated = (
        integer_value(dataset, keyword) for keyword in ("Rows", "Columns", "BitsAllocated")
    )
    if rows is None or columns is None or bits_allocated is None:
        return None
    bits = rows * columns * (integer_value(dataset, "SamplesPerPixel") or 1) * bits_allocated
    if bits % 8:
        # PS3.5 8.1.1: 1-bit frames need not start on a byte boundary; no ranges, but the
        # bytes must still hold every frame.
        if (bits * frames + 7) // 8 > length:
            raise InvalidInstance(
                f"Pixel Data holds {length} bytes, {frames} frame(s) of {bits} bits need more"
            )
        return None
    frame_length = bits // 8
    if frame_length * frames > length:
        raise InvalidInstance(
            f"Pixel Data holds {length} bytes, {frames} frame(s) of {frame_length} need more"
        )
    return native_frame_table(value_at, frame_length, frames)


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
    fp: BinaryIO, frames: int, file_size: int, limits: LimitsSettings
) -> bytes | memoryview | None:
    # PS3.5 A.4: a Basic Offset Table item, then one item per fragment, then a delimiter.
    tag, bot_at, bot_length = _read_item(fp, file_size)
    if tag != _ITEM:
        raise InvalidInstance("encapsulated Pixel Data does not start with an offset table item")
    if bot_length > 8 * frames:  # one 4-byte offset per frame (8 for an Extended Offset Table)
        raise InvalidInstance(
            f"the Basic Offset Table has {bot_length} bytes for {frames} frame(s) (PS3.5 A.4)"
        )
    first_fragment_at = fp.seek(bot_at + bot_length)
    # Only the fragments' value offsets, in one array: a whole-slide image has ~10^5 of them.
    table = EncapsulatedTableBuilder(frames)
    while True:
        tag, at, length = _read_item(fp, file_size)
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM:
            raise InvalidInstance(f"unexpected tag {tag:08X} inside encapsulated Pixel Data")
        table.add_fragment(at)
        if table.fragments > limits.elements_max:
            refuse_too_complex(
                f"the Pixel Data holds more than {limits.elements_max} fragments",
                "elements_max",
                limits.elements_max,
            )
        fp.seek(at + length)
    end = at  # just past the delimiter's header: where fragment n's value would begin

    fragments = table.fragments
    if not fragments:
        raise InvalidInstance("encapsulated Pixel Data holds no fragment")
    if fragments < frames:
        # PS3.5 A.4: a fragment holds data of one frame at most.
        raise InvalidInstance(
            f"Number of Frames is {frames}, the Pixel Data holds {fragments} fragment(s)"
        )
    if fragments == frames:
        return table.finish(end, None)
    if frames == 1:
        return table.finish(end, (0,))
    if bot_length // 4 == frames:
        starts = _starts_from_offset_table(fp, bot_at, frames, table, first_fragment_at)
    else:
        starts = _starts_from_markers(fp, table, end)
    if len(starts) != frames or starts[0] != 0:
        return None  # frames cannot be told apart without decoding; WADO-RS decodes instead
    return table.finish(end, starts)


def _starts_from_offset_table(
    fp: BinaryIO, bot_at: int, frames: int, table: EncapsulatedTableBuilder, first_at: int
) -> array[int]:
    """The fragments whose item begins at an offset of the Basic Offset Table (PS3.5 A.4:
    offsets from the first fragment's item, in frame order)."""
    fp.seek(bot_at)
    bot = array("I")
    bot.frombytes(fp.read(4 * frames))
    if sys.byteorder != "little":
        bot.byteswap()
    starts = array("Q")
    if all(a < b for a, b in zip(bot, bot[1:], strict=False)):
        # Increasing, as the standard has them: one merge pass, no set of 10^5 numbers.
        k = 0
        for i in range(table.fragments):
            offset = table.fragment_at(i) - 8 - first_at
            while k < frames and bot[k] < offset:
                k += 1
            if k == frames:
                break
            if bot[k] == offset:
                starts.append(i)
        return starts
    wanted = set(bot)
    starts.extend(
        i for i in range(table.fragments) if table.fragment_at(i) - 8 - first_at in wanted
    )
    return starts


def _starts_from_markers(fp: BinaryIO, table: EncapsulatedTableBuilder, end: int) -> array[int]:
    """Without a usable offset table: the fragments that begin with a JPEG SOI or J2K SOC
    marker (what pydicom's frame generator relies on too)."""
    starts = array("Q")
    fragments = table.fragments
    for i in range(fragments):
        at = table.fragment_at(i)
        next_at = table.fragment_at(i + 1) if i + 1 < fragments else end
        fp.seek(at)
        if next_at - 8 - at >= 2 and fp.read(2) in _FRAME_START_MARKERS:
            starts.append(i)
    return starts


def metadata_json(dataset: Dataset, has_pixel_data: bool) -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) of the header, with bulk data replaced by BulkDataURIs.

    The URIs are relative (``bulkdata/<tag>``); DICOMweb resolves them against the instance URL.
    Values are kept as stored even where they break their VR's rules (a modality's too-long
    LO, a UID with a leading zero): the metadata describes the stored file. An element that
    cannot be decoded at all is left out, with a warning.
    """
    encoded = _dataset_json(dataset)
    if has_pixel_data:
        # PS3.5 A.4: encapsulated Pixel Data is OB; native is OW above 8 bits allocated.
        syntax = uid_value(dataset.file_meta, "TransferSyntaxUID")
        encapsulated = syntax is not None and UID(syntax).is_encapsulated
        bits_allocated = integer_value(dataset, "BitsAllocated") or 8
        vr = "OW" if not encapsulated and bits_allocated > 8 else "OB"
        encoded[f"{PIXEL_DATA:08X}"] = {"vr": vr, "BulkDataURI": f"bulkdata/{PIXEL_DATA:08X}"}
    return encoded


def _bulk_data_uri(element: DataElement) -> str:
    return f"bulkdata/{element.tag:08X}"


def _dataset_json(dataset: Dataset) -> dict[str, Any]:
    encoded: dict[str, Any] = {}
    # The elements as held, raw or converted (iterating a Dataset would convert every one);
    # a copy of the list, as converting one below replaces it in the data set.
    for tag, raw in list(dataset.items()):
        try:
            # A raw value not there (deferred) is read and converted by pydicom below, which
            # raises what it raises on a VR it does not know (an item tag out of place, a
            # mangled explicit VR).
            try:
                fast = _fast_element_json(raw) if isinstance(raw, RawDataElement) else None
            except (ValueError, struct.error):  # not a value the fast path knows: pydicom's turn
                fast = None
            if fast is not None:
                encoded[f"{tag:08X}"] = fast
                continue
            element = dataset[tag]
            if element.VR == "SQ":
                items = [_dataset_json(item) for item in element.value]
                encoded[f"{tag:08X}"] = {"vr": "SQ", "Value": items}
            else:
                value = element.to_json_dict(_bulk_data_uri, BULK_DATA_THRESHOLD)
                encoded[f"{tag:08X}"] = _json_safe(value)
        except Exception as exc:  # pydicom raises anything on a value it cannot decode
            log.warning("metadata of (%04X,%04X) left out: %s", tag >> 16, tag & 0xFFFF, exc)
    return encoded


# What pydicom (3.x, default settings) makes of each VR's raw value, without building a
# DataElement: half of an ingest's metadata cost. Anything else goes through pydicom. Where
# pydicom fails on a value this reads (a PN ending in "^" under an ISO 2022 character set), the
# value is kept rather than left out.
_BINARY_FORMATS = {vr: (fmt, struct.calcsize(f"<{fmt}")) for vr, fmt in (
    ("US", "H"), ("SS", "h"), ("UL", "L"), ("SL", "l"), ("FL", "f"), ("FD", "d"),
    ("SV", "q"), ("UV", "Q"))}  # fmt: skip
_SPLIT_RSTRIPPED = {"AS", "CS", "DA", "DT", "TM"}  # the whole value rstripped, then split
_SPLIT_EACH_RSTRIPPED = {"LO", "SH", "UC"}  # split, then each value rstripped of NUL/space
_SINGLE = {"LT", "ST", "UT"}  # never split: backslash is text
# PS3.5 6.2: IS at most 12 characters (pydicom rounds longer ones through float), DS 16;
# only spaces around the number (float() refuses other characters str.strip() would drop).
_IS = re.compile(r"^ *[+-]?[0-9]{1,11} *$")
_DS = re.compile(r"^ *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)? *$")


def _fast_element_json(raw: RawDataElement) -> dict[str, Any] | None:
    """The DICOM JSON of a raw element of a common VR, or None to let pydicom do it."""
    value = raw.value
    if value is None or raw.is_buffered or raw.length == 0xFFFFFFFF:
        return None
    vr = raw.VR
    if vr is None:  # implicit VR: the data dictionary's, as pydicom does; private tags vary
        if raw.tag.is_private or not dictionary_has_tag(raw.tag):
            return None
        vr = dictionary_VR(raw.tag)
    if vr in _BINARY_FORMATS:
        fmt, size = _BINARY_FORMATS[vr]
        if not raw.is_little_endian or len(value) % size:
            return None
        numbers = list(struct.unpack(f"<{len(value) // size}{fmt}", value))
        if vr in ("FL", "FD"):
            numbers = [n if math.isfinite(n) else None for n in numbers]
        return {"vr": vr, "Value": numbers} if numbers else {"vr": vr}
    # ASCII bytes decode alike in every character set but ISO 2022's escape sequences.
    if not value.isascii() or b"\x1b" in value:
        return None
    text = value.decode("ascii")
    values: list[Any]
    if vr in _SPLIT_RSTRIPPED:
        values = text.rstrip(" \x00").split("\\")
    elif vr in _SPLIT_EACH_RSTRIPPED:
        values = [v.rstrip("\x00 ") for v in text.split("\\")]
    elif vr == "UI":
        values = [v.strip() for v in text.rstrip("\x00 ").split("\\")]
    elif vr == "AE":
        values = [v.strip() for v in text.split("\\")]
    elif vr in _SINGLE:
        values = [text.rstrip("\x00 ")]
    elif vr == "UR":
        values = [text.rstrip()]
    elif vr == "IS" or vr == "DS":
        values = text.rstrip(" \x00").split("\\")
        if values == [""]:
            return {"vr": vr}
        pattern, number = (_IS, int) if vr == "IS" else (_DS, float)
        if not all(pattern.match(v) for v in values):
            return None
        return {"vr": vr, "Value": [number(v) for v in values]}
    elif vr == "PN":
        names = value.rstrip(b"\x00 ").decode("ascii").split("\\")
        if names == [""]:
            return {"vr": vr}
        if any("=" in name or not name or "\x00" in name for name in names):
            return None  # ideographic / phonetic groups, empty names, NULs: pydicom decides
        return {"vr": vr, "Value": [{"Alphabetic": name} for name in names]}
    else:
        return None
    if values == [""]:
        return {"vr": vr}  # PS3.18 F.2.5: an empty value has no "Value"
    if any("\x00" in v for v in values):
        return None  # a NUL left inside a value: pydicom's path, then _json_safe
    return {"vr": vr, "Value": values}


def _json_safe(value: Any) -> Any:
    """PostgreSQL's JSONB rejects U+0000, which padded DICOM strings sometimes carry; and no
    JSON (RFC 8259 6) has NaN or an infinity, which an FL, FD or DS value may hold: such a
    value becomes null, as an empty value of a multi-valued element is (PS3.18 F.2.5)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
