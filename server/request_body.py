"""Every route's request body within its limit (issue 17): ``[http] body_max_bytes``, or the
route's own (STOW-RS: ``stow_max_bytes``), refused with ``413 Content Too Large`` (RFC 9110
15.5.14) and a reason naming the key, whether the client announced the body's size
(``Content-Length``: refused before a byte is read) or not (chunked transfer coding, RFC 9112
7.1: refused as soon as what was read passes the limit).

werkzeug alone stops a chunked body at the limit without a word when the app reads it whole
(``request.get_data()``, ``get_json()``: a JSON document cut short, then a 400), so the app's
request class is :class:`BoundedRequest` (Flask's ``request_class``), whose ``stream`` asks for
one byte more than is left, which tells a body that ends at the limit from one that goes on.
"""

from __future__ import annotations

import io
from functools import partial
from typing import IO, Any, cast

from flask import Request, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import get_input_stream

# The WSGI environ's entry naming the setting of the request's own limit (limit_body).
_LIMIT_KEY = "hilum.body_limit_key"
_PIECE = 64 << 10  # what reading a chunked body whole holds per read, besides the body


def limit_body(limit: int, key: str) -> None:
    """The current request's own body limit, ``key`` its setting, in place of the app's
    (``http.body_max_bytes``); set before the body is read."""
    request.max_content_length = limit
    request.environ[_LIMIT_KEY] = key


class BoundedRequest(Request):
    """Flask's request, whose body is refused with 413 and the reason once past its limit
    (``max_content_length``, the app's ``MAX_CONTENT_LENGTH`` unless :func:`limit_body`)."""

    @cached_property
    def stream(self) -> IO[bytes]:
        if self.shallow:  # as werkzeug's own: a request made to read nothing
            raise RuntimeError("this request was created with shallow=True: no body to read")
        limit = self.max_content_length
        if limit is None:
            return get_input_stream(self.environ, max_content_length=None)
        key = self.environ.get(_LIMIT_KEY, "http.body_max_bytes")
        if self.content_length is not None and self.content_length > limit:
            raise RequestEntityTooLarge(
                f"the request body ({self.content_length} bytes) is larger than {limit} bytes "
                f"({key})"
            )
        if "wsgi.input_terminated" not in self.environ:
            # A server that does not end the body itself: werkzeug's stream ends it at its
            # Content-Length (within the limit, checked above), or is empty without one.
            return get_input_stream(self.environ, max_content_length=limit)
        # The server ends the body (cheroot and gunicorn: at its Content-Length or its last
        # chunk; cheroot names wsgi.input_terminated even when False, as werkzeug reads it
        # too): read as the server returns it, within the limit. werkzeug's LimitedStream
        # would copy every read twice (a STOW-RS body's every byte).
        return cast(IO[bytes], _BodyWithinLimit(self.environ["wsgi.input"], limit, key))


class _BodyWithinLimit(io.RawIOBase):
    """A body that the server ends, refused with 413 once more than ``limit`` bytes of it were
    read (only a chunked one can be: a larger Content-Length is refused before); a read that
    fails is the client gone, as werkzeug's own stream says it (400)."""

    def __init__(self, stream: IO[bytes], limit: int, key: str) -> None:
        super().__init__()
        self._stream = stream
        self._left = limit
        self._reason = f"the request body is larger than {limit} bytes ({key})"

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        # One byte more than is left: a body that goes on past the limit shows it here.
        try:
            data = self._stream.read(min(size, self._left + 1))
        except (OSError, ValueError) as error:
            raise ClientDisconnected() from error
        self._left -= len(data)
        if self._left < 0:
            raise RequestEntityTooLarge(self._reason)
        return data

    def readall(self) -> bytes:
        return b"".join(iter(partial(self.read, _PIECE), b""))

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
