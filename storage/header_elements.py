"""Hilum's own read of a Part 10 file's header: the data set that pydicom's
``dcmread(fp, stop_before_pixels=True)`` builds, element for element the same, for the files
nearly every sender sends, at a fraction of its cost (ingest parses every received file).

The header's elements are walked over the file's first bytes in memory (read in 16 KiB
chunks, ``os.pread``) and kept raw, as pydicom keeps them (``RawDataElement``: tag, VR,
length, value bytes, value offset, encoding), in a ``FileDataset`` built by pydicom's own
constructors; an undefined-length sequence is read by pydicom's ``read_sequence``, as
``dcmread`` reads it. The File Meta Information elements pydicom converts while reading (the
first one, the group length, the Transfer Syntax UID) and the Specific Character Set are
converted here too, by pydicom.

Only what follows the encoding rules as pydicom reads them without a second guess is walked
(PS3.5 7.1: explicit or implicit VR little endian per the transfer syntax, every explicit VR one
pydicom knows, each value inside the file). Anything else, :func:`read_header` answers None and
the caller runs pydicom's ``dcmread``, which then decides (and warns or raises) as it always
did: a file without preamble or File Meta Information, big endian or deflated data sets, a
private transfer syntax, a Command Set group, a first element whose VR contradicts the transfer
syntax, a VR pydicom does not know, an undefined-length value that is not a sequence (or not
known to be one: a private tag, UN), a value or element header cut by the file's end, a File
Meta Information Group Length that does not match, and whatever pydicom's own conversions
refuse here.
"""

from __future__ import annotations

import os
import re
import struct
from typing import BinaryIO

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filereader import read_sequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import convert_string

_CHUNK = 16 << 10
_UNDEFINED = 0xFFFFFFFF
_ITEM_DELIMITER = 0xFFFEE00D
_SPECIFIC_CHARACTER_SET = 0x00080005
# Pixel Data, Float and Double Float Pixel Data: where stop_before_pixels stops.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_IMPLICIT = struct.Struct("<HHL")  # PS3.5 7.1.3: tag, 4-byte length
_EXPLICIT = struct.Struct("<HH2sH")  # PS3.5 7.1.2: tag, VR, 2-byte length
_LONG = struct.Struct("<L")  # the 4-byte length after a long VR's reserved bytes
# The VRs pydicom reads as explicit (its own table), as they appear in the file.
_VR_NAMES = {str(vr).encode("ascii"): str(vr) for vr in VR if len(str(vr)) == 2}
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)

Elements = dict[BaseTag, RawDataElement | DataElement]
_SYNTAX = re.compile(r"^[0-9.]{1,64}$")  # a value pydicom converts without a warning
# PS3.5 A.3, A.5: read by pydicom.
_NOT_WALKED = frozenset({ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian})


class _Head:
    """The file's first bytes, read further as the walk needs them (offsets are the file's)."""

    def __init__(self, fp: BinaryIO) -> None:
        self._fd = fp.fileno()
        self.size = os.fstat(self._fd).st_size
        self.data = os.pread(self._fd, _CHUNK, 0)

    def reach(self, end: int) -> bool:
        """Whether the bytes up to offset ``end`` are in :attr:`data` (read if need be)."""
        have = len(self.data)
        if end <= have:
            return True
        if end > self.size:
            return False
        # At least doubled: a large value costs a few reads, not one per chunk.
        self.data += os.pread(self._fd, max(end - have, have), have)
        return end <= len(self.data)


def read_header(fp: BinaryIO) -> tuple[FileDataset, int] | None:
    """``(dcmread(fp, stop_before_pixels=True), the offset where it stopped)`` for the open
    Part 10 file ``fp``, or None: pydicom's turn (module docstring). ``fp``'s position is
    left anywhere."""
    try:
        return _read_header(fp)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - pydicom's conversion refused a value: its read says why
        return None


def _read_header(fp: BinaryIO) -> tuple[FileDataset, int] | None:
    head = _Head(fp)
    if len(head.data) < 132 or head.data[128:132] != b"DICM":
        return None
    walked = _walk(head, fp, 132, implicit=False, file_meta=True)
    if walked is None or not walked[0]:
        return None
    meta_elements, at = walked
    syntax = _transfer_syntax(meta_elements, at)
    if syntax is None:
        return None
    # PS3.10 7.1: no Command Set group in a file; a data set of a whole element header at least.
    if head.size - at < 12 or head.data[at : at + 2] == b"\x00\x00":
        return None
    implicit = syntax == ImplicitVRLittleEndian
    # pydicom takes the encoding from the first element when it contradicts the syntax (and
    # warns): its turn.
    vr = head.data[at + 4 : at + 6]
    if implicit == (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B):
        return None
    walked = _walk(head, fp, at, implicit=implicit, file_meta=False)
    if walked is None:
        return None
    elements, pixel_data_at = walked
    file_meta = FileMetaDataset(meta_elements)
    file_meta.set_original_encoding(False, True, default_encoding)
    dataset = FileDataset(fp, elements, head.data[:128], file_meta, implicit, True)
    character_set = dataset.get(BaseTag(_SPECIFIC_CHARACTER_SET))
    encoding = convert_encodings(character_set.value) if character_set else default_encoding
    dataset.set_original_encoding(implicit, True, encoding)
    return dataset, pixel_data_at


def _transfer_syntax(meta: Elements, end: int) -> str | None:
    """The Transfer Syntax UID of a File Meta Information as pydicom reads it (without
    converting an element) when it starts with a File Meta Information Group Length that
    matches (PS3.10 7.1) and names a syntax walked here; else None."""
    first = next(iter(meta.values()))
    if not (
        isinstance(first, RawDataElement)
        and first.tag == 0x00020000
        and first.VR == "UL"
        and isinstance(first.value, bytes)
        and len(first.value) == 4
    ):
        return None  # pydicom converts the first element: it may refuse it
    if _LONG.unpack(first.value)[0] != end - (132 + 12):
        return None  # pydicom logs the mismatch
    raw = meta.get(BaseTag(0x00020010))
    if not isinstance(raw, RawDataElement) or raw.VR != "UI" or not raw.value:
        return None
    syntax = raw.value.decode("ascii").rstrip("\x00 ")
    if not _SYNTAX.match(syntax) or syntax in _NOT_WALKED or syntax in PrivateTransferSyntaxes:
        return None
    return syntax


def _walk(
    head: _Head, fp: BinaryIO, at: int, *, implicit: bool, file_meta: bool
) -> tuple[Elements, int] | None:
    """The elements from offset ``at`` to the end of the File Meta Information (``file_meta``)
    or to the top-level Pixel Data or the file's end, and the offset where it stopped; None
    where pydicom's reading would have to decide."""
    elements: Elements = {}
    encoding: str | list[str] = default_encoding
    size = head.size
    data = head.data
    have = len(data)
    while at < size:
        if at + 8 > have:
            if not head.reach(at + 8):
                return None
            data, have = head.data, len(head.data)
        vr: str | None
        if implicit:
            group, element, length = _IMPLICIT.unpack_from(data, at)
            vr = None
            value_at = at + 8
        else:
            group, element, raw_vr, length = _EXPLICIT.unpack_from(data, at)
            vr = _VR_NAMES.get(raw_vr)
            if vr is None and not (file_meta and group != 2):
                return None
            value_at = at + 8
            if vr in _LONG_VRS:
                if at + 12 > have:
                    if not head.reach(at + 12):
                        return None
                    data, have = head.data, len(head.data)
                (length,) = _LONG.unpack_from(data, at + 8)
                value_at = at + 12
        tag = group << 16 | element
        if tag == _ITEM_DELIMITER:
            return None
        if (group != 2) if file_meta else (tag in _PIXEL_TAGS):
            return elements, at
        key = BaseTag(tag)
        if length == _UNDEFINED:
            if file_meta:
                return None
            if vr is None:
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    return None  # a private tag: pydicom looks for items
            if vr != "SQ":
                return None
            fp.seek(value_at)
            sequence = read_sequence(fp, implicit, True, length, encoding)
            elements[key] = DataElement(key, vr, sequence, value_at, is_undefined_length=True)
            at = fp.tell()
            continue
        at = value_at + length
        if at > have:
            if not head.reach(at):
                return None
            data, have = head.data, len(head.data)
        value = data[value_at:at] if length else empty_value_for_VR(vr, raw=True)
        if tag == _SPECIFIC_CHARACTER_SET:
            encoding = convert_encodings(convert_string(data[value_at:at], True))
        elements[key] = RawDataElement(key, vr, length, value, value_at, implicit, True)  # type: ignore[arg-type]
    return elements, at
