"""multipart/related bodies (RFC 2387, PS3.18 8.6.1.1): written as a stream of parts, and read
as a stream, each part spooled to a file, so that no body is ever held in memory whole."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

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


class PartFile(Protocol):
    """Where a received part's content goes (``read_parts``'s ``spool``): written in pieces,
    then positioned at 0 for the caller, who closes it."""

    def write(self, data: bytes | memoryview, /) -> object: ...

    def seek(self, offset: int, whence: int = 0, /) -> object: ...

    def close(self) -> None: ...


F = TypeVar("F", bound=PartFile)


@dataclass
class ReceivedPart(Generic[F]):
    headers: dict[str, str]  # lower-case names
    file: F  # positioned at 0; the caller closes it

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def read_parts(
    stream: ByteStream, boundary: str, spool: Callable[[], F]
) -> Iterator[ReceivedPart[F]]:
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
    """The request stream, read in large pieces, with the delimiters found across their edges.

    The unread data is ``data[pos:]``: the last read as the stream returned it, never copied
    into a buffer of its own, so that a part's content goes from the read to its file as
    slices of that read (``copy_until``). Only the few bytes that may begin a delimiter split
    across two reads are joined to the next read, and a whole read only when it is shorter
    than a delimiter or when headers straddle two reads.
    """

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.data = b""
        self.pos = 0
        self.eof = False

    def _read(self) -> bytes:
        if self.eof:
            return b""
        chunk = self.stream.read(_READ_CHUNK)
        if not chunk:
            self.eof = True
        return chunk

    def _fill(self) -> bool:
        """Append the next read to the unread data; False at the end of the stream."""
        chunk = self._read()
        if not chunk:
            return False
        self.data = self.data[self.pos :] + chunk if self.pos < len(self.data) else chunk
        self.pos = 0
        return True

    def _unread(self) -> int:
        return len(self.data) - self.pos

    def _take(self, n: int, skip: int = 0) -> bytes:
        """The next ``n`` unread bytes, consumed with ``skip`` more."""
        data = self.data[self.pos : self.pos + n]
        self.pos += n + skip
        return data

    def read_exact(self, n: int) -> bytes:
        while self._unread() < n:
            if not self._fill():
                raise MultipartError("the body ends inside a multipart delimiter")
        return self._take(n)

    def consume_prefix(self, prefix: bytes) -> bool:
        """Drop ``prefix`` if the unread data starts with it."""
        while self._unread() < len(prefix) and self._fill():
            pass
        if self.data.startswith(prefix, self.pos):
            self.pos += len(prefix)
            return True
        return False

    def skip_to(self, delimiter: bytes) -> bool:
        """Drop everything up to and including ``delimiter`` at a line start."""
        while self._unread() < len(delimiter) and self._fill():
            pass
        if self.data.startswith(delimiter, self.pos):
            self.pos += len(delimiter)
            return True
        marker = b"\r\n" + delimiter
        while True:
            at = self.data.find(marker, self.pos)
            if at >= 0:
                self.pos = at + len(marker)
                return True
            # Keep only what may begin a marker split across reads.
            self.pos = max(self.pos, len(self.data) - len(marker) + 1)
            if not self._fill():
                return False

    def skip_line_rest(self, start: bytes) -> None:
        # RFC 2046: transport padding (spaces, tabs) may follow a delimiter before its CRLF.
        line = start + self.read_until(b"\r\n", 1024) if start != b"\r\n" else b""
        if line.strip(b" \t"):
            raise MultipartError("unexpected characters after a multipart delimiter")

    def read_until(self, marker: bytes, limit: int) -> bytes:
        while True:
            at = self.data.find(marker, self.pos)
            if at >= 0:
                return self._take(at - self.pos, len(marker))
            if self._unread() > limit:
                raise MultipartError("a multipart header is too long")
            if not self._fill():
                raise MultipartError("the body ends inside multipart headers")

    def copy_until(self, separator: bytes, out: PartFile) -> bool:
        """Write to ``out`` up to ``separator``, which is consumed; False at end of stream.

        Each read goes to ``out`` as slices of itself; only the last ``len(separator) - 1``
        bytes of a read, which may begin a separator that the next read completes, are held
        back and checked together with the start of the next read.
        """
        n = len(separator)
        while True:
            data, pos = self.data, self.pos
            at = data.find(separator, pos)
            if at >= 0:
                if at > pos:
                    out.write(memoryview(data)[pos:at])
                self.pos = at + n
                return True
            keep = max(pos, len(data) - n + 1)
            if keep > pos:
                out.write(memoryview(data)[pos:keep])
            tail = data[keep:]
            chunk = self._read()
            if not chunk:
                self.data, self.pos = tail, 0
                return False
            if len(chunk) < n:
                self.data, self.pos = tail + chunk, 0  # a short read: joined, it is small
                continue
            # A separator that begins in the held-back tail ends within the next n - 1 bytes.
            at = (tail + chunk[: n - 1]).find(separator)
            if at >= 0:
                if at:
                    out.write(tail[:at])
                self.data, self.pos = chunk, at + n - len(tail)
                return True
            if tail:
                out.write(tail)
            self.data, self.pos = chunk, 0
