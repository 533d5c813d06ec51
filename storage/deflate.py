"""The data set of a Deflated Explicit VR Little Endian file (PS3.5 A.5: everything after the
File Meta Information compressed with RFC 1951 deflate, no zlib header), inflated as a
stream: a small compressed file can claim gigabytes, so the inflated bytes are counted as they
come, at most 1 MiB at a time, and refused past ``limits.inflated_max_bytes``: never held
whole in memory to find out."""

from __future__ import annotations

import zlib
from typing import BinaryIO

from storage.errors import InvalidInstance
from storage.limits import refuse_too_large

_INPUT_CHUNK = 64 << 10
_OUTPUT_CHUNK = 1 << 20  # the most one inflate step may produce


class InflatingReader:
    """Forward-only reads of the inflated data set; ``position`` counts inflated bytes."""

    def __init__(self, source: BinaryIO, limit: int) -> None:
        self._source = source
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._limit = limit
        self._inflated = 0
        self._ended = False
        self.position = 0

    def _fill(self, wanted: int) -> None:
        while len(self._buffer) < wanted and not self._ended:
            # Output is bounded per step; input that would inflate past it waits in
            # unconsumed_tail for the next step.
            data = self._inflater.unconsumed_tail or self._source.read(_INPUT_CHUNK)
            try:
                if data:
                    out = self._inflater.decompress(data, _OUTPUT_CHUNK)
                else:
                    out = self._inflater.flush()  # at most the last window's bytes
                    self._ended = True
            except zlib.error as error:
                raise InvalidInstance(
                    f"the deflated data set cannot be inflated: {error}"
                ) from None
            self._inflated += len(out)
            if self._inflated > self._limit:
                refuse_too_large(
                    f"the deflated data set inflates to more than {self._limit} bytes",
                    "inflated_max_bytes",
                    self._limit,
                )
            self._buffer += out
            if self._inflater.eof:
                self._ended = True

    def read(self, size: int) -> bytes:
        self._fill(size)
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        self.position += len(out)
        return out
