"""The Identifier of a pending C-FIND response encoded straight from a row of
:func:`storage.query.search` to bytes, without a pydicom Dataset per match.

It produces exactly the bytes pydicom would encode for :func:`server.dimse.identifier.
response_identifier`: the same elements in ascending tag order (PS3.5 7.1), the same values,
each padded to even length (PS3.5 6.2: a space, a NULL for UI), Specific Character Set
``ISO_IR 192`` when any value is not ASCII. Little endian only, implicit VR (PS3.5 7.1.3) or
explicit VR (PS3.5 7.1.2). A row it cannot encode this way (a value that is not text, a
non-ASCII value in a VR that has no character set, a value too long for its length field) is
encoded through pydicom instead (:meth:`ResponseIdentifierEncoder.encode_directly` raises
:class:`NotEncodable` for it); a request it cannot serve at all raises :class:`Unsupported`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

from pynetdicom.dsutils import encode

from server.dimse.identifier import (
    QUERY_RETRIEVE_LEVEL,
    RETRIEVE_AE_TITLE,
    SPECIFIC_CHARACTER_SET,
    TEXT_VRS,
    UTF8,
    QueryRequest,
    response_identifier,
)
from storage.dicom_file import LONG_LENGTH_VRS

# PS3.5 6.1.2.3: the VRs whose values are in the Specific Character Set; the others are ASCII
# (pydicom would write a non-ASCII one in its default encoding, so such a row goes through it).
CHARACTER_SET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
_SHORT_LENGTH_LIMIT = 0xFFFE  # the largest even value of a 2-byte length field

_UINT16 = struct.Struct("<H")
_UINT32 = struct.Struct("<I")


class Unsupported(Exception):
    """The request's responses cannot be encoded here; use pydicom for each of them."""


class NotEncodable(Exception):
    """One row holds a value this encoder leaves to pydicom."""


class _Element:
    """One requested key: the element's header bytes and how to write its value."""

    def __init__(self, tag: int, vr: str, keyword: str, *, implicit_vr: bool) -> None:
        self.keyword = keyword
        self.vr = vr
        self.pad = b"\x00" if vr == "UI" else b" "
        self.charset = vr in CHARACTER_SET_VRS
        self.text = vr in TEXT_VRS
        header = _UINT16.pack(tag >> 16) + _UINT16.pack(tag & 0xFFFF)
        if implicit_vr:
            self.length: Callable[[int], bytes] = _UINT32.pack
            self.limit = 0xFFFFFFFE
        elif vr in LONG_LENGTH_VRS:
            header += vr.encode("ascii") + b"\x00\x00"
            self.length = _UINT32.pack
            self.limit = 0xFFFFFFFE
        else:
            header += vr.encode("ascii")
            self.length = _UINT16.pack
            self.limit = _SHORT_LENGTH_LIMIT
        self.header = header
        self.empty = header + self.length(0)

    def with_text(self, text: str) -> bytes:
        data = text.encode("ascii")
        return self.with_bytes(data)

    def with_bytes(self, data: bytes) -> bytes:
        if len(data) % 2:
            data += self.pad
        if len(data) > self.limit:
            raise NotEncodable
        return self.header + self.length(len(data)) + data


class ResponseIdentifierEncoder:
    """The encoder of every pending response Identifier of one C-FIND request."""

    def __init__(self, request: QueryRequest, retrieve_ae_title: str, *, implicit_vr: bool) -> None:
        self._request = request
        self._retrieve_ae_title = retrieve_ae_title
        self._implicit_vr = implicit_vr
        level = _Element(QUERY_RETRIEVE_LEVEL, "CS", "", implicit_vr=implicit_vr)
        charset = _Element(SPECIFIC_CHARACTER_SET, "CS", "", implicit_vr=implicit_vr)
        self._specific_character_set = charset.with_text(UTF8)
        # (tag, constant bytes or None for the character set, or the element of a value)
        slots: list[tuple[int, bytes | _Element | None]] = [
            (int(QUERY_RETRIEVE_LEVEL), level.with_text(request.query.level.value)),
            (int(SPECIFIC_CHARACTER_SET), None),
        ]
        for key in request.requested:
            tag = int(key.tag)
            if key.tag.element == 0 and key.tag.group > 6:
                continue  # PS3.5 7.2: Group Length is retired; pydicom does not write it
            if key.tag == RETRIEVE_AE_TITLE:
                title = _Element(tag, "AE", "", implicit_vr=implicit_vr)
                try:
                    slots.append((tag, title.with_text(retrieve_ae_title)))
                except (UnicodeEncodeError, NotEncodable):
                    raise Unsupported(f"Retrieve AE Title {retrieve_ae_title!r}") from None
                continue
            if len(key.vr) != 2 or not key.vr.isascii():
                raise Unsupported(f"VR {key.vr!r} of {key.tag}")
            element = _Element(tag, key.vr, key.keyword, implicit_vr=implicit_vr)
            # PS3.4 C.2.2.1.3: sequence matching is not supported; a sequence returns empty.
            slots.append((tag, element.empty if key.vr == "SQ" else element))
        slots.sort(key=lambda slot: slot[0])
        self._slots = [slot for _, slot in slots]
        self._charset_index = self._slots.index(None)

    def encode(self, row: Mapping[str, Any]) -> bytes:
        """The Identifier of the pending response for ``row``, in the context's encoding."""
        try:
            return self.encode_directly(row)
        except NotEncodable:
            ds = response_identifier(self._request, row, self._retrieve_ae_title)
            encoded = encode(ds, self._implicit_vr, True)
            if encoded is None:  # pynetdicom's encode returns None where pydicom fails
                raise ValueError("the response identifier cannot be encoded") from None
            return encoded

    def encode_directly(self, row: Mapping[str, Any]) -> bytes:
        """:meth:`encode` without pydicom: :class:`NotEncodable` when the row needs it."""
        parts: list[bytes] = []
        non_ascii = False
        for slot in self._slots:
            if slot is None or isinstance(slot, bytes):
                parts.append(slot or b"")
                continue
            value = row.get(slot.keyword) if slot.keyword else None
            if value is None:
                parts.append(slot.empty)
                continue
            if not slot.text:
                raise NotEncodable
            if isinstance(value, list):
                text = "\\".join(str(v) for v in value)
            elif isinstance(value, str):
                text = value
            elif isinstance(value, int) and not isinstance(value, bool):
                text = str(value)
            else:
                raise NotEncodable
            if text.isascii():
                parts.append(slot.with_text(text))
            elif slot.charset:
                non_ascii = True
                parts.append(slot.with_bytes(text.encode("utf-8")))
            else:
                raise NotEncodable
        if non_ascii:
            parts[self._charset_index] = self._specific_character_set
        return b"".join(parts)
