"""The streaming multipart/related reader and writer (pure logic, no server)."""

from __future__ import annotations

import io

import pytest

from server.dicomweb.multipart import (
    MultipartError,
    OutgoingPart,
    check_boundary,
    read_parts,
    write_parts,
)


class Trickle(io.RawIOBase):
    """A stream that returns at most ``step`` bytes per read, like a slow socket."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.at = data, step, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.data[self.at : self.at + self.step]
        self.at += len(chunk)
        return chunk


def parts_of(body: bytes, boundary: str = "b0und", step: int = 1 << 20) -> list[tuple[dict, bytes]]:
    return [
        (part.headers, part.file.read())
        for part in read_parts(Trickle(body, step), boundary, io.BytesIO)  # type: ignore[arg-type]
    ]


@pytest.mark.parametrize("step", [1, 7, 64, 1 << 20])
def test_round_trip_whatever_the_read_size(step: int) -> None:
    contents = [b"first\r\n--b0unce", b"", b"\r\n--b0un" * 50]
    body = b"".join(
        write_parts(
            [OutgoingPart("application/dicom", [c], "http://x/1") for c in contents], "b0und"
        )
    )
    received = parts_of(b"preamble\r\n" + body + b"epilogue", step=step)
    assert [content for _, content in received] == contents
    assert received[0][0] == {"content-type": "application/dicom", "content-location": "http://x/1"}


def test_transport_padding_after_a_delimiter_is_allowed() -> None:
    body = b"--b0und  \r\nContent-Type: a/b\r\n\r\nX\r\n--b0und--"
    assert parts_of(body) == [({"content-type": "a/b"}, b"X")]


@pytest.mark.parametrize("step", [1, 3, 1 << 20])
def test_a_part_without_header_fields(step: int) -> None:
    # RFC 2046 5.1.1: the CRLF that ends the (empty) header area follows the delimiter line.
    body = b"--b0und\r\n\r\nfirst\r\n--b0und\r\nContent-Type: a/b\r\n\r\nX\r\n--b0und--"
    assert parts_of(body, step=step) == [({}, b"first"), ({"content-type": "a/b"}, b"X")]


@pytest.mark.parametrize(
    "body",
    [
        b"no delimiter at all",
        b"--b0und\r\nContent-Type: a/b\r\n\r\nunterminated part",
        b"--b0und\r\nno colon here\r\n\r\nX\r\n--b0und--",
        b"--b0und junk\r\n\r\nX\r\n--b0und--",
    ],
)
def test_malformed_bodies(body: bytes) -> None:
    with pytest.raises(MultipartError):
        parts_of(body)


def test_boundary_characters_are_checked() -> None:
    assert check_boundary("0f3cf5c0-70e0-41ef") == "0f3cf5c0-70e0-41ef"
    with pytest.raises(MultipartError):
        check_boundary("bad\r\nboundary")


class Reads(io.RawIOBase):
    """A stream whose reads return exactly the pieces given, then the end."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    def read(self, size: int = -1) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def test_a_delimiter_split_at_every_offset_across_two_reads() -> None:
    # The reader holds back the last bytes of a read that may begin a delimiter and checks
    # them with the start of the next: every cut of "\r\n--b0und" between two large reads.
    first = b"A" * 100 + b"\r\nnear \r\n--b0un miss"  # a near-delimiter inside the content
    second = b"B" * 100
    body = b"".join(
        write_parts([OutgoingPart("a/b", [first]), OutgoingPart("a/b", [second])], "b0und")
    )
    separator_at = body.index(b"\r\n--b0und\r\nContent-Type")
    for cut in range(separator_at - 3, separator_at + len(b"\r\n--b0und") + 3):
        received = [
            part.file.read()
            for part in read_parts(Reads([body[:cut], body[cut:]]), "b0und", io.BytesIO)  # type: ignore[arg-type]
        ]
        assert received == [first, second], cut


@pytest.mark.parametrize("step", [9, 10, 11, 12])
def test_reads_about_as_long_as_the_delimiter(step: int) -> None:
    # "\r\n--b0und" is 9 bytes: a read shorter than it is joined to what was held back, one as
    # long or longer is checked with the held-back bytes without joining it.
    contents = [b"x" * 37, b"", b"\r\n--b0un" * 3, b"y"]
    body = b"".join(write_parts([OutgoingPart("a/b", [c]) for c in contents], "b0und"))
    assert [content for _, content in parts_of(body, step=step)] == contents


def test_a_part_without_content_type_among_others() -> None:
    body = b"--b0und\r\nContent-Location: x\r\n\r\nfirst\r\n--b0und\r\n\r\n\r\n--b0und--\r\n"
    assert parts_of(body, step=5) == [({"content-location": "x"}, b"first"), ({}, b"")]
