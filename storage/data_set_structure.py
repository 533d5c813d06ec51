"""One pass over the element and item headers of a Part 10 file, before pydicom parses it, to
refuse what pydicom would spend unbounded memory or stack on: sequences nested deeper than
``limits.sequence_max_depth`` (pydicom reads them recursively), more than
``limits.elements_max`` elements, a deflated data set inflating past
``limits.inflated_max_bytes``.

The file is read through a window (``os.pread``, 16 KiB), not mapped (a file truncated under
a map would kill the process): values are skipped by moving an offset, so the pass costs a few
operations per element header and nothing per value byte. The walk follows the encoding rules
of PS3.5 7 the way pydicom reads them: explicit or implicit VR per the transfer syntax, but
taken from the first element's VR when that disagrees (pydicom does, for the data set and for
each item of an explicit VR sequence); an explicit VR that is not two capital letters read as
implicit; items (FFFE,E000) of defined or undefined length ended by their length or an Item
Delimitation Item (FFFE,E00D); undefined-length sequences ended by a Sequence Delimitation Item
(FFFE,E0DD); UN of undefined length, and UN of a tag the dictionary knows as SQ, read as an
implicit VR Little Endian sequence (PS3.5 6.2.2). It stops at the top-level Pixel Data, as
ingest's parse does.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from config.settings import LimitsSettings
from storage.blobs import BlobStream
from storage.deflate import InflatingReader
from storage.errors import InvalidInstance
from storage.limits import refuse_too_complex

_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Pixel Data, Float Pixel Data, Double Float Pixel Data: where pydicom's stop_before_pixels stops.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# PS3.5 7.1.2: explicit VRs with a 2-byte reserved field and a 4-byte length.
_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_TRANSFER_SYNTAX_UID = 0x00020010
_HEADER = {True: struct.Struct("<HHL"), False: struct.Struct(">HHL")}
_SHORT = {True: struct.Struct("<H"), False: struct.Struct(">H")}
_LONG = {True: struct.Struct("<L"), False: struct.Struct(">L")}
# A File Meta Information element header: tag, VR, 2-byte length (PS3.5 7.1.2).
_META_ELEMENT = struct.Struct("<HH2sH")
_ITEM_TAG = {True: struct.pack("<HH", 0xFFFE, 0xE000), False: struct.pack(">HH", 0xFFFE, 0xE000)}
_INFLATE_CHUNK = 1 << 20


@dataclass(frozen=True)
class Part10Structure:
    """What the pass learnt. ``inflated``: a deflated file's data set, inflated into a
    temporary file (positioned at its start) for the header parse; open only inside
    :func:`part10_structure`."""

    transfer_syntax_uid: str
    has_pixel_data_element: bool
    inflated: BinaryIO | None


@contextlib.contextmanager
def part10_structure(fp: BinaryIO, limits: LimitsSettings) -> Iterator[Part10Structure | None]:
    """Walk the element headers of the open Part 10 file ``fp`` and refuse it past a limit;
    None when it is not a Part 10 file with a preamble (pydicom then says why)."""
    window = _Window(fp)
    if window.size < 132 or window.bytes_at(128, 4) != b"DICM":
        yield None
        return
    syntax, data_set_at, elements = _file_meta_transfer_syntax(window, limits)
    if syntax != DeflatedExplicitVRLittleEndian:
        little = syntax != ExplicitVRBigEndian
        pixel_at = _walk(window, data_set_at, little, elements, limits)
        yield Part10Structure(syntax, pixel_at is not None, None)
        return
    # PS3.5 A.5: the data set after the File Meta Information is deflated.
    fp.seek(data_set_at)
    with tempfile.TemporaryFile() as inflated:
        _inflate(fp, inflated, limits)
        pixel_at = _walk(_Window(inflated), 0, True, elements, limits)
        inflated.seek(0)
        yield Part10Structure(syntax, pixel_at is not None, inflated)  # type: ignore[arg-type]


class _Window:
    """Up to 16 KiB of a file in memory (a header rarely holds more; the pixels that follow are
    not copied), read again elsewhere when a walk leaves it."""

    SIZE = 16 << 10

    def __init__(self, fp: BinaryIO) -> None:
        self._fd = fp.fileno()
        self.size = os.fstat(self._fd).st_size
        self.buf = b""
        self.base = 0  # the file offset of buf[0]

    def load(self, at: int) -> None:
        self.buf = os.pread(self._fd, self.SIZE, at)
        self.base = at

    def bytes_at(self, at: int, size: int) -> bytes:
        if not self.base <= at <= at + size <= self.base + len(self.buf):
            self.load(at)
        return self.buf[at - self.base : at - self.base + size]


def _inflate(source: BinaryIO, target: BinaryIO, limits: LimitsSettings) -> None:
    """The whole deflated stream into ``target``, refused as soon as it passes the cap."""
    reader = InflatingReader(source, limits.inflated_max_bytes)
    while chunk := reader.read(_INFLATE_CHUNK):
        target.write(chunk)
    target.flush()


def _looks_explicit(buf: bytes, at: int) -> bool:
    """Whether an element header at ``at`` has two capital letters where the VR goes."""
    return 0x40 < buf[at + 4] < 0x5B and 0x40 < buf[at + 5] < 0x5B


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _too_many(limits: LimitsSettings) -> None:
    refuse_too_complex(
        f"the data set holds more than {limits.elements_max} elements",
        "elements_max",
        limits.elements_max,
    )


def _walk(
    window: _Window, start: int, little: bool, elements: int, limits: LimitsSettings
) -> int | None:
    """Walk the data set from file offset ``start`` to the top-level Pixel Data (its header's
    offset) or the end (None), refusing it past a limit. ``elements``: counted before (the
    file meta). Offsets in ``stack`` are file offsets; ``pos`` is one in ``buf``, the window
    at file offset ``base``, loaded again whenever fewer than 12 bytes of it are left."""
    unpack_header, unpack_short, unpack_long = (
        _HEADER[little].unpack_from,
        _SHORT[little].unpack_from,
        _LONG[little].unpack_from,
    )
    size, most, deepest = window.size, limits.elements_max, limits.sequence_max_depth
    window.load(start)
    buf, base, pos = window.buf, start, 0
    # (is a sequence, end file offset or -1 for undefined length, implicit VR inside)
    stack: list[tuple[bool, int, bool]] = []
    depth = 0
    # pydicom takes the top-level encoding from the first element's VR, whatever the
    # transfer syntax says.
    implicit = not (len(buf) >= 6 and _looks_explicit(buf, 0))
    while True:
        if pos + 12 > len(buf) and base + pos < size:
            window.load(base + pos)
            buf, base, pos = window.buf, base + pos, 0
        if stack:
            in_sequence, end, level_implicit = stack[-1]
            if 0 <= end <= base + pos:
                stack.pop()
                depth -= in_sequence
                continue
        else:
            in_sequence, level_implicit = False, implicit
        if pos + 8 > len(buf):
            return None  # the end (or a truncation pydicom reports)
        at = base + pos
        group, element, length = unpack_header(buf, pos)
        tag = group << 16 | element
        vr = buf[pos + 4 : pos + 6]
        pos += 8
        if in_sequence:
            if tag == _SEQUENCE_DELIMITER:
                stack.pop()
                depth -= 1
                continue
            # Any other tag is read as an item header, as pydicom does; an item of an explicit
            # VR sequence may itself be implicit VR (pydicom looks at its first element). Items
            # count as elements: pydicom builds a data set for each, empty or not.
            elements += 1
            if elements > most:
                _too_many(limits)
            first = window.bytes_at(base + pos, 6) if pos + 6 > len(buf) else buf[pos : pos + 6]
            item_implicit = level_implicit or (len(first) == 6 and not _looks_explicit(first, 0))
            end = -1 if length == _UNDEFINED else base + pos + length
            stack.append((False, end, item_implicit))
            continue
        if tag == _ITEM_DELIMITER:
            if not stack:
                return None  # pydicom ends the data set here
            stack.pop()
            continue
        elements += 1
        if elements > most:
            _too_many(limits)
        if not stack and tag in _PIXEL_TAGS:
            return at
        sequence_implicit: bool | None  # None: not a sequence; else how its items are encoded
        if not level_implicit and b"AA" <= vr <= b"ZZ":
            if vr in _LONG_LENGTH_VRS:
                if pos + 4 > len(buf):
                    return None
                (length,) = unpack_long(buf, pos)
                pos += 4
            else:
                (length,) = unpack_short(buf, pos - 2)
            if vr != b"SQ" and vr != b"UN":
                sequence_implicit = None  # the common case, decided without a look-up
            elif vr == b"SQ":
                sequence_implicit = level_implicit
            elif length == _UNDEFINED or _dictionary_vr(tag) == "SQ":
                # PS3.5 6.2.2: an undefined-length UN is an implicit VR Little Endian
                # sequence; pydicom also reads a UN the dictionary knows as SQ that way.
                sequence_implicit = True
            else:
                sequence_implicit = None
        else:
            known = _dictionary_vr(tag)
            if known == "SQ":
                sequence_implicit = True
            elif known is None and length == _UNDEFINED:
                # A private tag of undefined length: a sequence when items follow (pydicom
                # looks).
                items_follow = window.bytes_at(base + pos, 4) == _ITEM_TAG[little]
                sequence_implicit = True if items_follow else None
            else:
                sequence_implicit = None
        if sequence_implicit is not None:
            depth += 1
            if depth > deepest:
                refuse_too_complex(
                    f"sequences nest more than {deepest} deep", "sequence_max_depth", deepest
                )
            end = -1 if length == _UNDEFINED else base + pos + length
            stack.append((True, end, sequence_implicit))
        elif length == _UNDEFINED:
            after, elements = _fragments(window, base + pos, _HEADER[little], elements, limits)
            window.load(after)
            buf, base, pos = window.buf, after, 0
        else:
            pos += length


def _fragments(
    window: _Window, at: int, header: struct.Struct, elements: int, limits: LimitsSettings
) -> tuple[int, int]:
    """Pass over the items of an undefined-length value that is not a sequence (encapsulated
    Pixel Data, PS3.5 A.4) up to its Sequence Delimitation Item: (file offset after, elements)."""
    while True:
        raw = window.bytes_at(at, 8)
        if len(raw) < 8:
            return window.size, elements
        group, element, length = header.unpack(raw)
        tag = group << 16 | element
        at += 8
        if tag == _SEQUENCE_DELIMITER:
            return at, elements
        if tag != _ITEM or length == _UNDEFINED:
            raise InvalidInstance(
                f"an undefined-length value holds ({group:04X},{element:04X}), "
                "not an item of defined length"
            )
        elements += 1
        if elements > limits.elements_max:
            _too_many(limits)
        at += length


def _file_meta_transfer_syntax(window: _Window, limits: LimitsSettings) -> tuple[str, int, int]:
    """PS3.10 7.1: the File Meta Information, explicit VR Little Endian group 0002 elements,
    none of them a sequence: (its Transfer Syntax UID, where the data set starts, elements)."""
    syntax, at, elements = "", 132, 0
    while True:
        head = window.bytes_at(at, 12)
        if len(head) < 8:
            break
        group, element, _ = _HEADER[True].unpack_from(head)
        if group != 0x0002:
            break
        elements += 1
        if elements > limits.elements_max:
            _too_many(limits)
        vr = head[4:6]
        if vr in _LONG_LENGTH_VRS:
            if len(head) < 12:
                break
            (length,) = _LONG[True].unpack_from(head, 8)
            at += 12
        else:
            (length,) = _SHORT[True].unpack_from(head, 6)
            at += 8
        if vr == b"SQ" or length == _UNDEFINED:
            raise InvalidInstance(
                f"the File Meta Information element ({group:04X},{element:04X}) is a sequence "
                "or of undefined length (PS3.10 7.1)"
            )
        if (group << 16 | element) == _TRANSFER_SYNTAX_UID and length <= 256:
            syntax = window.bytes_at(at, length).decode("latin-1").rstrip("\x00 ").strip()
        at += length
    if not syntax:
        raise InvalidInstance("the file meta information lacks a valid Transfer Syntax UID")
    return syntax, at, elements


def skip_file_meta(stream: BlobStream) -> bytes | None:
    """Read a stored Part 10 file's preamble and File Meta Information (PS3.10 7.1) from
    ``stream``; return the bytes of the data set read past them (usually none), the rest being
    left in the stream. None when the file has no preamble."""
    head = stream.read(132)
    if len(head) < 132 or head[128:] != b"DICM":
        return None
    while True:
        element = stream.read(_META_ELEMENT.size)
        if len(element) < _META_ELEMENT.size:
            return element  # a data set shorter than an element header, or none
        group, number, vr, length = _META_ELEMENT.unpack(element)
        if group != 0x0002:
            return element  # the first element of the data set (no group length was given)
        if vr in _LONG_LENGTH_VRS:
            length = struct.unpack("<I", stream.read(4))[0]
        value = stream.read(length)
        if number == 0x0000 and vr == b"UL" and len(value) == 4:
            # PS3.10 7.1: File Meta Information Group Length: the rest of group 0002.
            stream.read(struct.unpack("<I", value)[0])
            return b""
