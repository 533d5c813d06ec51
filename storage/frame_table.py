"""Where each frame of a stored instance lies in its file: the table ingest records (the
``frame_table`` column, migration 0012) and WADO-RS reads to fetch one frame with one ranged
read.

A whole-slide image has up to some 100 000 frames, so the table is built and read without a
Python object per frame: packed unsigned 64-bit little-endian words, sliced where one frame's
entry lies, never decoded as a whole.

- Native pixel data (PS3.5 8.1.1), frames one after another: ``NATIVE, value offset, frame
  length, frames`` (32 bytes whatever the number of frames).
- Encapsulated pixel data (PS3.5 A.4): ``ENCAPSULATED, frames, fragments``, then the offset of
  each fragment's value and, last, the offset just past the Sequence Delimitation Item's header
  (``fragments + 1`` boundaries: the items follow one another, each value behind its 8-byte item
  header, so fragment ``i`` spans ``[bound[i], bound[i + 1] - 8)``); then, only when there are
  more fragments than frames, the index of each frame's first fragment. 8 bytes per fragment.

Rows written before migration 0012 hold the table as JSON in ``frame_ranges`` (per frame, its
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

NATIVE, ENCAPSULATED = 1, 2
_WORD = struct.Struct("<Q")
_HEADER = struct.Struct("<QQQ")  # kind and two counts (or value offset and frame length)
_NATIVE = struct.Struct("<QQQQ")
_ITEM_HEADER = 8  # PS3.5 A.4: (FFFE,E000) tag and a 4-byte length before each fragment

# Per frame, its [offset, length] fragments: the JSON form of rows before migration 0012.
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
    return _NATIVE.pack(NATIVE, value_at, frame_length, frames)


class EncapsulatedTableBuilder:
    """Collects fragment offsets as encapsulated Pixel Data is scanned (PS3.5 A.4), in one
    ``array('Q')``: 8 bytes per fragment, no object per fragment."""

    def __init__(self, frames: int) -> None:
        self._words = array("Q", (ENCAPSULATED, frames, 0))

    def add_fragment(self, value_at: int) -> None:
        """The next fragment, whose value begins at ``value_at`` (just past its item header)."""
        self._words.append(value_at)

    @property
    def fragments(self) -> int:
        return len(self._words) - 3

    def fragment_at(self, index: int) -> int:
        """The offset of fragment ``index``'s value."""
        return self._words[3 + index]

    def finish(self, end: int, first_fragments: Iterable[int] | None) -> bytes:
        """The packed table. ``end``: the offset just past the Sequence Delimitation Item's
        header (where a next item's value would begin); ``first_fragments``: the index of
        each frame's first fragment, None when there is one fragment per frame."""
        words = self._words
        fragments = len(words) - 3
        words[2] = fragments
        words.append(end)
        if first_fragments is not None:
            words.extend(first_fragments)
        expected = 4 + fragments + (0 if first_fragments is None else words[1])
        if len(words) != expected:
            raise ValueError(f"{len(words) - 4 - fragments} first fragments for {words[1]} frames")
        if sys.byteorder != "little":
            words.byteswap()
        packed = words.tobytes()
        self._words = array("Q")  # released before the row is written
        return packed


class PackedFrameTable:
    """A table of :func:`native_frame_table` or :class:`EncapsulatedTableBuilder`; each look-up
    unpacks only the words of the frame asked for."""

    __slots__ = ("_packed", "_kind", "_frames", "_fragments", "_a", "_b")

    def __init__(self, packed: bytes) -> None:
        if len(packed) < _NATIVE.size or len(packed) % 8:
            raise ValueError(f"a frame table of {len(packed)} bytes")
        self._packed = packed
        self._kind, self._a, self._b = _HEADER.unpack_from(packed)
        if self._kind == NATIVE:
            (self._frames,) = _WORD.unpack_from(packed, 24)
            self._fragments = self._frames
            if len(packed) != _NATIVE.size or not self._frames:
                raise ValueError(
                    f"a native frame table of {len(packed)} bytes, {self._frames} frames"
                )
        elif self._kind == ENCAPSULATED:
            self._frames, self._fragments = self._a, self._b
            starts = 0 if self._fragments == self._frames else self._frames
            if not 0 < self._frames <= self._fragments or len(packed) != 8 * (
                4 + self._fragments + starts
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
        return hash(self._packed)

    def __repr__(self) -> str:
        return f"PackedFrameTable({self._frames} frames, {len(self._packed)} bytes)"

    @property
    def number_of_frames(self) -> int:
        return self._frames

    @property
    def pixel_data_at(self) -> int:
        return self._a if self._kind == NATIVE else self._bound(0)

    def byte_ranges(self, number: int) -> list[tuple[int, int]]:
        if not 1 <= number <= self._frames:
            raise IndexError(f"frame {number} of {self._frames}")
        if self._kind == NATIVE:
            return [(self._a + (number - 1) * self._b, self._b)]
        first, end = self._fragment_span(number)
        bounds = struct.unpack_from(f"<{end - first + 1}Q", self._packed, 8 * (3 + first))
        return [(bounds[i], bounds[i + 1] - _ITEM_HEADER - bounds[i]) for i in range(end - first)]

    def _fragment_span(self, number: int) -> tuple[int, int]:
        """First fragment of frame ``number`` and the one after its last."""
        if self._fragments == self._frames:
            return number - 1, number
        starts_at = 8 * (4 + self._fragments)
        first = self._word_at(starts_at, number - 1)
        end = self._fragments if number == self._frames else self._word_at(starts_at, number)
        if not first < end <= self._fragments:
            raise ValueError(f"frame {number}: fragments {first} to {end} of {self._fragments}")
        return first, end

    def _bound(self, index: int) -> int:
        return self._word_at(24, index)

    def _word_at(self, offset: int, index: int) -> int:
        (value,) = _WORD.unpack_from(self._packed, offset + 8 * index)
        return int(value)


class JsonFrameTable:
    """A row written before migration 0012: the JSON ``frame_ranges`` list, as stored."""

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
    migration 0012) its JSON ``frame_ranges``; None when it has neither, or one that does not
    hold together (logged: its frames are then read from the whole file)."""
    try:
        if packed is not None:
            return PackedFrameTable(packed)
        if legacy:
            return JsonFrameTable(legacy)
    except ValueError as error:
        log.warning("frame table of %s not used: %s", blob_key, error)
    return None
