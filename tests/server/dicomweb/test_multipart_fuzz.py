"""Properties of the STOW-RS multipart reader (RFC 2046 5.1.1, PS3.18 8.6.1.1), issue 17:
a well-formed body gives back exactly its parts however the stream is cut into reads; any
other body gives parts or :class:`MultipartError`, never another exception; and memory stays
bounded by the read size, not by the body or by a part that never ends."""

from __future__ import annotations

import contextlib
import io
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from server.dicomweb.multipart import (
    MultipartError,
    OutgoingPart,
    ReceivedPart,
    check_boundary,
    read_parts,
    write_parts,
)

FUZZ = settings(max_examples=300, deadline=2000, derandomize=True, database=None)
BOUNDARY = "b0undary.x"


class Trickle(io.RawIOBase):
    """A request stream that returns at most the next of ``sizes`` bytes per read (a socket
    hands over whatever has arrived), so delimiters fall across read edges."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data = memoryview(data)
        self.sizes = sizes or [1 << 20]
        self.reads = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        step = self.sizes[self.reads % len(self.sizes)]
        self.reads += 1
        n = min(step, len(self.data)) if size < 0 else min(size, step, len(self.data))
        chunk, self.data = bytes(self.data[:n]), self.data[n:]
        return chunk


def _read_all(stream: io.RawIOBase, boundary: str = BOUNDARY) -> list[tuple[dict[str, str], bytes]]:
    parts = []
    part: ReceivedPart
    for part in read_parts(stream, boundary, io.BytesIO):  # type: ignore[arg-type]
        with part.file:
            parts.append((part.headers, part.file.read()))
    return parts


def _body(contents: list[bytes], boundary: str = BOUNDARY) -> bytes:
    parts = [OutgoingPart("application/dicom", [content]) for content in contents]
    return b"".join(write_parts(parts, boundary))


_CONTENT = st.binary(max_size=300).filter(lambda b: b"--" + BOUNDARY.encode() not in b)
_SIZES = st.lists(st.integers(1, 64), max_size=8)


@FUZZ
@given(
    contents=st.lists(_CONTENT, min_size=1, max_size=5),
    sizes=_SIZES,
    preamble=st.sampled_from([b"", b"preamble\r\n", b"\r\n"]),
)
def test_a_well_formed_body_gives_back_its_parts_whatever_the_reads(
    contents: list[bytes], sizes: list[int], preamble: bytes
) -> None:
    parts = _read_all(Trickle(preamble + _body(contents), sizes))
    assert [content for _, content in parts] == contents
    assert all(headers == {"content-type": "application/dicom"} for headers, _ in parts)


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 4096), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 4096), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 4096), st.sampled_from(list(b"-\r\n: \t\x00x"))),
    st.tuples(st.just("delimiter"), st.integers(0, 4096), st.sampled_from([0, 1, 2])),
)
_DELIMITERS = [b"\r\n--" + BOUNDARY.encode(), b"--" + BOUNDARY.encode() + b"--", b"\r\n\r\n"]


def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        at = where % max(1, len(out))
        if kind == "flip" and at < len(out):
            out[at] = value
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = bytes([value]) * 3
        elif kind == "delimiter":
            out[at:at] = _DELIMITERS[value]
    return bytes(out)


@FUZZ
@given(
    contents=st.lists(_CONTENT, min_size=1, max_size=3),
    mutations=st.lists(_MUTATION, min_size=1, max_size=5),
    sizes=_SIZES,
)
def test_any_body_gives_parts_or_a_multipart_error(
    contents: list[bytes], mutations: list[tuple[str, int, int]], sizes: list[int]
) -> None:
    try:
        parts = _read_all(Trickle(_mutate(_body(contents), mutations), sizes))
    except MultipartError as error:
        assert str(error)  # the reason the 400 carries
        return
    assert len(parts) <= len(contents) + 4 * len(mutations)


@FUZZ
@given(data=st.binary(max_size=1024), sizes=_SIZES)
def test_arbitrary_bytes_give_parts_or_a_multipart_error(data: bytes, sizes: list[int]) -> None:
    with contextlib.suppress(MultipartError):
        _read_all(Trickle(data, sizes))


@FUZZ
@given(boundary=st.text(max_size=80))
def test_a_boundary_is_accepted_only_as_rfc_2046_allows(boundary: str) -> None:
    try:
        checked = check_boundary(boundary)
    except MultipartError:
        return
    # RFC 2046 5.1.1: 1 to 70 bchars, not ending in a space; then it reads back.
    assert 1 <= len(checked) <= 70 and not checked.endswith(" ")
    assert [c for _, c in _read_all(Trickle(_body([b"x"], checked), []), checked)] == [b"x"]


class Discard(io.RawIOBase):
    """A spool file that keeps nothing (the real one is on disk)."""

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        return len(data)


def _peak(stream: io.RawIOBase) -> int:
    tracemalloc.start()
    try:
        for part in read_parts(stream, BOUNDARY, Discard):  # type: ignore[arg-type]
            part.file.close()
    except MultipartError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


class Endless(io.RawIOBase):
    """``total`` bytes of ``filler``, produced as they are read (never held whole)."""

    def __init__(self, head: bytes, filler: bytes, total: int) -> None:
        self.head, self.filler, self.left = head, filler * (65536 // len(filler)), total

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.head:
            chunk, self.head = self.head, b""
            return chunk
        n = min(self.left, len(self.filler), size if size >= 0 else len(self.filler))
        self.left -= n
        return self.filler[:n]


def test_memory_does_not_follow_the_body() -> None:
    delimiter = b"--" + BOUNDARY.encode() + b"\r\n"
    cases = {
        # A part of 64 MiB that never ends, spooled as it arrives.
        "endless part": Endless(delimiter + b"\r\n", b"x", 64 << 20),
        # Part headers that never end: refused past their limit.
        "endless headers": Endless(delimiter, b"X-Header: value\r\n", 64 << 20),
        # A preamble with no delimiter at all.
        "no delimiter": Endless(b"", b"-", 64 << 20),
        # Delimiters almost matching, over and over.
        "near delimiters": Endless(delimiter + b"\r\n", b"\r\n--b0undary", 64 << 20),
    }
    for name, stream in cases.items():
        peak = _peak(stream)
        assert peak < 8 << 20, (name, peak)  # the reader's buffer: a read or two
