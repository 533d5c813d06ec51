"""One pass over the element and item headers of a Part 10 file, before pydicom parses it, to
refuse what pydicom would spend unbounded memory or stack on: sequences nested deeper than
``limits.sequence_max_depth`` (pydicom reads them recursively), more than
``limits.elements_max`` elements, a deflated data set inflating past
``limits.inflated_max_bytes``.

Values are skipped, never read, so the pass costs a few reads per element header. The walk
follows the encoding rules of PS3.5 7 the way pydicom reads them: explicit or implicit VR per
the transfer syntax; an explicit VR that is not two capital letters read as implicit, as pydicom
does; items (FFFE,E000) of defined or undefined length ended by their length or an Item
Delimitation Item (FFFE,E00D); undefined-length sequences ended by a Sequence Delimitation Item
(FFFE,E0DD); UN of undefined length, and UN of a tag the dictionary knows as SQ, read as an
implicit VR Little Endian sequence (PS3.5 6.2.2). It stops at the top-level Pixel Data, as
ingest's parse does.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from pydicom.datadict import dictionary_VR
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from config.settings import LimitsSettings
from storage.deflate import InflatingReader
from storage.errors import InvalidInstance
from storage.limits import refuse_too_complex

_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Pixel Data, Float Pixel Data, Double Float Pixel Data: where pydicom's stop_before_pixels stops.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# PS3.5 7.1.2: explicit VRs with a 2-byte reserved field and a 4-byte length.
_LONG_LENGTH_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_TRANSFER_SYNTAX_UID = 0x00020010


class _Reader(Protocol):
    position: int

    def read(self, size: int) -> bytes: ...
    def peek(self, size: int) -> bytes: ...
    def skip(self, size: int) -> bool: ...


class _FileReader:
    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp
        self._size = os.fstat(fp.fileno()).st_size
        self.position = fp.tell()

    def read(self, size: int) -> bytes:
        data = self._fp.read(size)
        self.position += len(data)
        return data

    def peek(self, size: int) -> bytes:
        data = self._fp.read(size)
        self._fp.seek(self.position)
        return data

    def skip(self, size: int) -> bool:
        if self.position + size > self._size:
            return False
        self.position += size
        self._fp.seek(self.position)
        return True


@dataclass(frozen=True)
class Part10Structure:
    """What the pass learnt: the transfer syntax, where the data set starts in the file, and
    (for a deflated file) how many inflated bytes come before the top-level Pixel Data, or all
    of them when there is none."""

    transfer_syntax_uid: str
    data_set_at: int
    inflated_header_bytes: int | None
    has_pixel_data_element: bool


@dataclass
class _Level:
    is_sequence: bool
    end: int | None  # position after its last byte; None: undefined length
    implicit: bool


class _Walk:
    def __init__(self, reader: _Reader, little_endian: bool, limits: LimitsSettings) -> None:
        self.reader = reader
        self.endian = "<" if little_endian else ">"
        self.limits = limits
        self.elements = 0

    def count(self, n: int = 1) -> None:
        self.elements += n
        if self.elements > self.limits.elements_max:
            refuse_too_complex(
                f"the data set holds more than {self.limits.elements_max} elements",
                "elements_max",
                self.limits.elements_max,
            )

    def data_set(self, implicit: bool) -> int | None:
        """Walk the data set to the top-level Pixel Data (its header's position) or the end
        (None)."""
        reader, endian = self.reader, self.endian
        stack: list[_Level] = []
        depth = 0
        # pydicom takes the encoding of the top-level data set from its first element's VR,
        # whatever the transfer syntax says.
        first = reader.peek(6)
        if len(first) == 6:
            implicit = not _looks_explicit(first)
        while True:
            if stack and stack[-1].end is not None and reader.position >= stack[-1].end:
                depth -= stack.pop().is_sequence
                continue
            at = reader.position
            head = reader.read(8)
            if len(head) < 8:
                return None  # the end (or a truncation pydicom reports)
            group, element, length = struct.unpack(f"{endian}HHL", head)
            tag = group << 16 | element
            level = stack[-1] if stack else None
            if level is not None and level.is_sequence:
                if tag == _SEQUENCE_DELIMITER:
                    depth -= stack.pop().is_sequence
                    continue
                # Any other tag is read as an item header, as pydicom does; an item of an
                # explicit VR sequence may itself be implicit VR (pydicom looks at its first
                # element's VR; PS3.5 6.2.2).
                end = None if length == _UNDEFINED else reader.position + length
                item_implicit = level.implicit
                if not item_implicit:
                    first = reader.peek(6)
                    item_implicit = len(first) == 6 and not _looks_explicit(first)
                stack.append(_Level(False, end, item_implicit))
                continue
            if tag == _ITEM_DELIMITER:
                if level is None:
                    return None  # pydicom ends the data set here
                stack.pop()
                continue
            self.count()
            if level is None and tag in _PIXEL_TAGS:
                return at
            implicit_here = level.implicit if level is not None else implicit
            vr: str | None = None
            if not implicit_here and b"AA" <= head[4:6] <= b"ZZ":
                vr = head[4:6].decode("ascii")
                if vr in _LONG_LENGTH_VRS:
                    extra = reader.read(4)
                    if len(extra) < 4:
                        return None
                    (length,) = struct.unpack(f"{endian}L", extra)
                else:
                    (length,) = struct.unpack(f"{endian}H", head[6:8])
            sequence_implicit = self._sequence_encoding(tag, vr, length, implicit_here)
            if sequence_implicit is not None:
                depth += 1
                if depth > self.limits.sequence_max_depth:
                    refuse_too_complex(
                        f"sequences nest more than {self.limits.sequence_max_depth} deep",
                        "sequence_max_depth",
                        self.limits.sequence_max_depth,
                    )
                end = None if length == _UNDEFINED else reader.position + length
                stack.append(_Level(True, end, sequence_implicit))
            elif length == _UNDEFINED:
                self.fragments()
            elif not reader.skip(length):
                return None

    def _sequence_encoding(
        self, tag: int, vr: str | None, length: int, implicit: bool
    ) -> bool | None:
        """None when the element is not read as a sequence; else whether its items are
        implicit VR."""
        if vr == "SQ":
            return implicit
        if vr == "UN":
            # PS3.5 6.2.2: an undefined-length UN is an implicit VR Little Endian sequence;
            # pydicom also reads a UN whose tag the dictionary knows as SQ that way.
            return True if length == _UNDEFINED or _dictionary_vr(tag) == "SQ" else None
        if vr is not None:
            return None
        known = _dictionary_vr(tag)
        if known == "SQ":
            return True
        if known is None and length == _UNDEFINED:
            # A private tag of undefined length: a sequence when items follow (pydicom looks).
            peeked = self.reader.peek(4)
            if len(peeked) == 4:
                group, element = struct.unpack(f"{self.endian}HH", peeked)
                if group << 16 | element == _ITEM:
                    return True
        return None

    def fragments(self) -> None:
        """Pass over the items of an undefined-length value that is not a sequence
        (encapsulated Pixel Data, PS3.5 A.4) up to its Sequence Delimitation Item."""
        while True:
            head = self.reader.read(8)
            if len(head) < 8:
                return
            group, element, length = struct.unpack(f"{self.endian}HHL", head)
            tag = group << 16 | element
            if tag == _SEQUENCE_DELIMITER:
                return
            if tag != _ITEM or length == _UNDEFINED:
                raise InvalidInstance(
                    f"an undefined-length value holds ({group:04X},{element:04X}), "
                    "not an item of defined length"
                )
            self.count()
            if not self.reader.skip(length):
                return


def _looks_explicit(head: bytes) -> bool:
    """Whether an element header starts tag, VR: two capital letters where the VR goes."""
    return 0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def check_part10_structure(path: Path, limits: LimitsSettings) -> Part10Structure | None:
    """Walk the file's element headers and refuse it past a limit; None when it is not a
    Part 10 file with a preamble (pydicom then says why)."""
    with open(path, "rb") as fp:
        if fp.read(132)[128:] != b"DICM":
            return None
        reader = _FileReader(fp)
        walk = _Walk(reader, True, limits)
        syntax = _file_meta_transfer_syntax(reader, walk)
        data_set_at = reader.position
        if syntax == DeflatedExplicitVRLittleEndian:
            inflating = InflatingReader(fp, limits.inflated_max_bytes)
            walk.reader = inflating
            pixel_at = walk.data_set(implicit=False)
            header_bytes = pixel_at if pixel_at is not None else inflating.position
            # The rest (Pixel Data and what follows) counts towards the cap as well.
            while inflating.skip(1 << 20):
                pass
            return Part10Structure(syntax, data_set_at, header_bytes, pixel_at is not None)
        walk.endian = ">" if syntax == ExplicitVRBigEndian else "<"
        pixel_at = walk.data_set(implicit=syntax == ImplicitVRLittleEndian)
        return Part10Structure(syntax, data_set_at, None, pixel_at is not None)


def _file_meta_transfer_syntax(reader: _FileReader, walk: _Walk) -> str:
    """PS3.10 7.1: the File Meta Information, explicit VR Little Endian group 0002 elements,
    none of them a sequence; the Transfer Syntax UID it names."""
    syntax = ""
    while True:
        head = reader.peek(8)
        if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 0x0002:
            break
        reader.read(8)
        walk.count()
        group, element = struct.unpack("<HH", head[:4])
        vr = head[4:6].decode("latin-1")
        if vr in _LONG_LENGTH_VRS:
            (length,) = struct.unpack("<L", reader.read(4).rjust(4, b"\xff"))
        else:
            (length,) = struct.unpack("<H", head[6:8])
        if vr == "SQ" or length == _UNDEFINED:
            raise InvalidInstance(
                f"the File Meta Information element ({group:04X},{element:04X}) is a sequence "
                "or of undefined length (PS3.10 7.1)"
            )
        if (group << 16 | element) == _TRANSFER_SYNTAX_UID and length <= 256:
            syntax = reader.read(length).decode("latin-1").rstrip("\x00 ").strip()
        elif not reader.skip(length):
            break
    if not syntax:
        raise InvalidInstance("the file meta information lacks a valid Transfer Syntax UID")
    return syntax
