"""Where each frame of a stored instance lies in its file: the table ingest records (the
``frame_table`` column, migration 0013) and WADO-RS reads to fetch one frame with one ranged
read.

A whole-slide image has up to some 100 000 frames, so the table is built and read without a
Python object per frame: packed little-endian words after a 32-byte header of four unsigned
64-bit words, sliced where one frame's entry lies, never decoded as a whole.

- Native pixel data (PS3.5 8.1.1), frames one after another: ``NATIVE, value offset, frame
  length, frames``, the header alone (32 bytes whatever the number of frames).
- Encapsulated pixel data (PS3.5 A.4): ``ENCAPSULATED, frames, fragments, base`` (base: the
  first fragment's value offset), then unsigned 32-bit words relative to base: the offset of
  each fragment's value and, last, the offset just past the Sequence Delimitation Item's header
  (``fragments + 1`` bounds: the items follow one another, each value behind its 8-byte item
  header, so fragment ``i`` spans ``[bound[i], bound[i + 1] - 8)``); then, only when there are
  more fragments than frames, the index of each frame's first fragment. 4 bytes per fragment;
  ``ENCAPSULATED_WIDE``, the same in 64-bit words, when the fragments span 4 GiB or more.

Rows written before migration 0013 hold the table as JSON in ``frame_ranges`` (per frame, its
``[offset, length]`` fragments); :class:`JsonFrameTable` reads them with the same interface, and
:func:`stored_frame_table` picks whichever a row has.
"""

from __future__ import annotations

import logging
import struct
import sys
from array import array
from collections.abc import Iterable
from typing import Protocol

log = logging.getLogger(__name__)

NATIVE, ENCAPSULATED, ENCAPSULATED_WIDE = 1, 2, 3
_HEADER = struct.Struct("<QQQQ")  # every table's first 32 bytes
_WIDTH = {ENCAPSULATED: (4, "I"), ENCAPSULATED_WIDE: (8, "Q")}
_ITEM_HEADER = 8  # PS3.5 A.4: (FFFE,E000) tag and a 4-byte length before each fragment

# Per frame, its [offset, length] fragments: the JSON form of rows before migration 0013.
LegacyFrameRanges = list[list[list[int]]]


class FrameTable(Protocol):
    """The byte ranges of each frame of a stored instance, in whichever form the row holds."""

    @property
    def number_of_frames(self) -> int: ...

    @property
    def pixel_data_at(self) -> int:
        """Where the first frame's bytes begin: everything before is the header and the
        Pixel Data element's own header (and, encapsulated, the Basic Offset Table)."""
        ...

    def byte_ranges(self, number: int) -> list[tuple[int, int]]:
        """The ``(offset, length)`` of each fragment of frame ``number`` (one-based), in file
        order; one range for a native frame."""
        ...


def native_frame_table(value_at: int, frame_length: int, frames: int) -> bytes:
    """The table of ``frames`` native frames of ``frame_length`` bytes from ``value_at``."""
    return _HEADER.pack(NATIVE, value_at, frame_length, frames)


class EncapsulatedTableBuilder:
    """Collects fragment offsets as encapsulated Pixel Data is scanned (PS3.5 A.4), in one
    array that becomes the packed table: 4 bytes per fragment (8 past 4 GiB of Pixel Data), no
    object per fragment."""

    def __init__(self, frames: int) -> None:
        self._frames = frames
        self._base = -1
        # The header's 32 bytes first, filled in by finish(): the array is the table.
        self._words = array("I", bytes(_HEADER.size))
        self._skip = _HEADER.size // 4

    def add_fragment(self, value_at: int) -> None:
        """The next fragment, whose value begins at ``value_at`` (just past its item header)."""
        if self._base < 0:
            self._base = value_at
        self._append(value_at - self._base)

    def _append(self, relative: int) -> None:
        if relative > 0xFFFFFFFF and self._words.typecode == "I":
            wide = array("Q", bytes(_HEADER.size))
            wide.extend(iter(self._words[self._skip :]))
            self._words, self._skip = wide, _HEADER.size // 8
        self._words.append(relative)

    @property
    def fragments(self) -> int:
        return len(self._words) - self._skip

    def fragment_at(self, index: int) -> int:
        """The offset of fragment ``index``'s value."""
        return self._base + self._words[self._skip + index]

    def finish(self, end: int, first_fragments: Iterable[int] | None) -> memoryview:
        """The packed table. ``end``: the offset just past the Sequence Delimitation Item's
        header (where a next item's value would begin); ``first_fragments``: the index of
        each frame's first fragment, None when there is one fragment per frame."""
        fragments = self.fragments
        if not fragments:
            raise ValueError("a frame table without fragments")
        self._append(end - self._base)
        words = self._words
        if first_fragments is not None:
            words.extend(iter(first_fragments))  # an array of another type code too
            if len(words) != self._skip + fragments + 1 + self._frames:
                raise ValueError(f"first fragments for {self._frames} frames do not add up")
        kind = ENCAPSULATED if words.typecode == "I" else ENCAPSULATED_WIDE
        header = _HEADER.pack(kind, self._frames, fragments, self._base)
        words[: self._skip] = array(
            words.typecode, struct.unpack(f"<{self._skip}{words.typecode}", header)
        )
        if sys.byteorder != "little":
            words.byteswap()
        self._words = array("I")
        # The array's own bytes, not a copy: the database driver makes the one copy it needs.
        return memoryview(words).cast("B")


class PackedFrameTable:
    """A table of :func:`native_frame_table` or :class:`EncapsulatedTableBuilder`; each look-up
    unpacks only the words of the frame asked for."""

    __slots__ = ("_packed", "_kind", "_frames", "_fragments", "_a", "_b", "_width", "_format")

    def __init__(self, packed: bytes | memoryview) -> None:
        if len(packed) < _HEADER.size:
            raise ValueError(f"a frame table of {len(packed)} bytes")
        self._packed = packed
        self._kind, a, b, c = _HEADER.unpack_from(packed)
        if self._kind == NATIVE:
            self._a, self._b, self._frames = a, b, c  # value offset, frame length
            self._fragments, self._width, self._format = c, 0, ""
            if len(packed) != _HEADER.size or not self._frames:
                raise ValueError(
                    f"a native frame table of {len(packed)} bytes, {self._frames} frames"
                )
        elif self._kind in _WIDTH:
            self._frames, self._fragments, self._a, self._b = a, b, c, 0  # base offset
            self._width, self._format = _WIDTH[self._kind]
            starts = 0 if self._fragments == self._frames else self._frames
            words = self._fragments + 1 + starts
            if not 0 < self._frames <= self._fragments or len(packed) != (
                _HEADER.size + self._width * words
            ):
                raise ValueError(
                    f"an encapsulated frame table of {len(packed)} bytes for {self._frames} "
                    f"frame(s) in {self._fragments} fragment(s)"
                )
        else:
            raise ValueError(f"a frame table of unknown kind {self._kind}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PackedFrameTable) and other._packed == self._packed

    def __hash__(self) -> int:
        return hash(bytes(self._packed))

    def __repr__(self) -> str:
        return f"PackedFrameTable({self._frames} frames, {len(self._packed)} bytes)"

    @property
    def number_of_frames(self) -> int:
        return self._frames

    @property
    def pixel_data_at(self) -> int:
        return self._a if self._kind == NATIVE else self._a + self._word(0)

    def byte_ranges(self, number: int) -> list[tuple[int, int]]:
        if not 1 <= number <= self._frames:
            raise IndexError(f"frame {number} of {self._frames}")
        if self._kind == NATIVE:
            return [(self._a + (number - 1) * self._b, self._b)]
        first, end = self._fragment_span(number)
        bounds = struct.unpack_from(
            f"<{end - first + 1}{self._format}", self._packed, _HEADER.size + self._width * first
        )
        base = self._a
        return [
            (base + bounds[i], bounds[i + 1] - _ITEM_HEADER - bounds[i]) for i in range(end - first)
        ]

    def _fragment_span(self, number: int) -> tuple[int, int]:
        """First fragment of frame ``number`` and the one after its last."""
        if self._fragments == self._frames:
            return number - 1, number
        starts = self._fragments + 1
        first = self._word(starts + number - 1)
        end = self._fragments if number == self._frames else self._word(starts + number)
        if not first < end <= self._fragments:
            raise ValueError(f"frame {number}: fragments {first} to {end} of {self._fragments}")
        return first, end

    def _word(self, index: int) -> int:
        (value,) = struct.unpack_from(
            f"<{self._format}", self._packed, _HEADER.size + self._width * index
        )
        return int(value)


class JsonFrameTable:
    """A row written before migration 0013: the JSON ``frame_ranges`` list, as stored."""

    __slots__ = ("_ranges",)

    def __init__(self, ranges: LegacyFrameRanges) -> None:
        if not ranges or not all(ranges):
            raise ValueError("a frame_ranges list with a frame without fragments")
        self._ranges = ranges

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JsonFrameTable) and other._ranges == self._ranges

    __hash__ = None  # type: ignore[assignment]  # a list inside

    def __repr__(self) -> str:
        return f"JsonFrameTable({len(self._ranges)} frames)"

    @property
    def number_of_frames(self) -> int:
        return len(self._ranges)

    @property
    def pixel_data_at(self) -> int:
        return int(self._ranges[0][0][0])

    def byte_ranges(self, number: int) -> list[tuple[int, int]]:
        if not 1 <= number <= len(self._ranges):
            raise IndexError(f"frame {number} of {len(self._ranges)}")
        return [(int(offset), int(length)) for offset, length in self._ranges[number - 1]]


def stored_frame_table(
    packed: bytes | None, legacy: LegacyFrameRanges | None, blob_key: str = ""
) -> FrameTable | None:
    """The frame table of an instance row: its packed ``frame_table``, else (a row from before
    migration 0013) its JSON ``frame_ranges``; None when it has neither, or one that does not
    hold together (logged: its frames are then read from the whole file)."""
    try:
        if packed is not None:
            return PackedFrameTable(packed)
        if legacy:
            return JsonFrameTable(legacy)
    except ValueError as error:
        log.warning("frame table of %s not used: %s", blob_key, error)
    return None
