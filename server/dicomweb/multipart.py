"""multipart/related bodies (RFC 2387, PS3.18 8.6.1.1): written as a stream of parts, and read
as a stream, each part spooled to a file, so that no body is ever held in memory whole."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Protocol

_READ_CHUNK = 1 << 20
_MAX_HEADER_BYTES = 16 * 1024
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{1,70}$")  # RFC 2046 5.1.1 bchars


class MultipartError(ValueError):
    """The body is not a well-formed multipart message."""


class ByteStream(Protocol):
    """What a body is read from: the request's stream, or a wrapper that counts what it reads."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class OutgoingPart:
    content_type: str
    chunks: Iterable[bytes]
    content_location: str | None = None


def new_boundary() -> str:
    return uuid.uuid4().hex


def write_parts(parts: Iterable[OutgoingPart], boundary: str) -> Iterator[bytes]:
    """The body, chunk by chunk: each part's headers, then its content as it is produced."""
    for part in parts:
        head = f"--{boundary}\r\nContent-Type: {part.content_type}\r\n"
        if part.content_location:
            head += f"Content-Location: {part.content_location}\r\n"
        yield (head + "\r\n").encode("ascii")
        yield from part.chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def check_boundary(boundary: str) -> str:
    if not _BOUNDARY.match(boundary) or boundary.endswith(" "):
        raise MultipartError(f"invalid multipart boundary {boundary[:80]!r}")
    return boundary


@dataclass
class ReceivedPart:
    headers: dict[str, str]  # lower-case names
    file: IO[bytes]  # positioned at 0; the caller closes it

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def read_parts(
    stream: ByteStream, boundary: str, spool: Callable[[], IO[bytes]]
) -> Iterator[ReceivedPart]:
    """Yield each part of the body read from ``stream``, its content written to ``spool()``.

    A part is yielded only once it is complete; the next is read when the caller asks for it.
    """
    reader = _Reader(stream)
    delimiter = b"--" + boundary.encode("ascii")
    # RFC 2046 5.1.1: a preamble may come before the first delimiter; it is ignored.
    if not reader.skip_to(delimiter):
        raise MultipartError("the body holds no multipart delimiter")
    separator = b"\r\n" + delimiter
    while True:
        ending = reader.read_exact(2)
        if ending == b"--":
            return  # close delimiter; the epilogue is ignored
        reader.skip_line_rest(ending)
        if reader.consume_prefix(b"\r\n"):
            headers: dict[str, str] = {}  # RFC 2046 5.1.1: a part may have no header fields
        else:
            headers = _parse_headers(reader.read_until(b"\r\n\r\n", _MAX_HEADER_BYTES))
        file = spool()
        try:
            if not reader.copy_until(separator, file):
                raise MultipartError("the body ends inside a part (no closing delimiter)")
            file.seek(0)
        except BaseException:
            file.close()
            raise
        yield ReceivedPart(headers, file)


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise MultipartError(f"malformed part header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


class _Reader:
    """A buffer over the request stream that finds delimiters across chunk edges."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.stream.read(_READ_CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._fill():
                raise MultipartError("the body ends inside a multipart delimiter")
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def consume_prefix(self, prefix: bytes) -> bool:
        """Drop ``prefix`` if the unread data starts with it."""
        while len(self.buffer) < len(prefix) and self._fill():
            pass
        if self.buffer.startswith(prefix):
            del self.buffer[: len(prefix)]
            return True
        return False

    def skip_to(self, delimiter: bytes) -> bool:
        """Drop everything up to and including ``delimiter`` at a line start."""
        while True:
            if self.buffer.startswith(delimiter):
                del self.buffer[: len(delimiter)]
                return True
            at = self.buffer.find(b"\r\n" + delimiter)
            if at >= 0:
                del self.buffer[: at + 2 + len(delimiter)]
                return True
            keep = len(delimiter) + 2
            if len(self.buffer) > keep:
                del self.buffer[: len(self.buffer) - keep]
            if not self._fill():
                return False

    def skip_line_rest(self, start: bytes) -> None:
        # RFC 2046: transport padding (spaces, tabs) may follow a delimiter before its CRLF.
        line = start + self.read_until(b"\r\n", 1024) if start != b"\r\n" else b""
        if line.strip(b" \t"):
            raise MultipartError("unexpected characters after a multipart delimiter")

    def read_until(self, marker: bytes, limit: int) -> bytes:
        while True:
            at = self.buffer.find(marker)
            if at >= 0:
                data = bytes(self.buffer[:at])
                del self.buffer[: at + len(marker)]
                return data
            if len(self.buffer) > limit:
                raise MultipartError("a multipart header is too long")
            if not self._fill():
                raise MultipartError("the body ends inside multipart headers")

    def copy_until(self, separator: bytes, out: IO[bytes]) -> bool:
        """Write to ``out`` up to ``separator``, which is consumed; False at end of stream."""
        while True:
            at = self.buffer.find(separator)
            if at >= 0:
                out.write(self.buffer[:at])
                del self.buffer[: at + len(separator)]
                return True
            # Keep a tail that may be the start of a separator split across chunks.
            flush = len(self.buffer) - len(separator) + 1
            if flush > 0:
                out.write(self.buffer[:flush])
                del self.buffer[:flush]
            if not self._fill():
                return False
