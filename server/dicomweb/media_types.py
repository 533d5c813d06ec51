"""Accept header negotiation for WADO-RS (PS3.18 8.7): media types and transfer syntaxes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
# PS3.18 Table 8.7.3-2: the media type of a frame in each compressed transfer syntax.
FRAME_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg2",
    "1.2.840.10008.1.2.4.101": "video/mpeg2",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
}
# Transfer syntaxes an instance can be transcoded into on retrieval (pydicom's encoders).
TRANSCODE_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless)
_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}


class NotAcceptable(Exception):
    """No representation the client accepts can be produced (HTTP 406)."""


@dataclass(frozen=True)
class AcceptedType:
    media_type: str  # the part type for multipart/related ranges, e.g. "application/dicom"
    transfer_syntax: str | None
    multipart: bool
    quality: float


_ITEM = re.compile(r'(?:[^,"]|"[^"]*")+')
_PARAMETER = re.compile(r'\s*;\s*([^=;\s]+)\s*=\s*("[^"]*"|[^;]*)')


def parse_accept(header: str | None) -> list[AcceptedType]:
    """The Accept header's ranges, best first; an absent header accepts anything."""
    if not header or not header.strip():
        return [AcceptedType("*/*", None, True, 1.0)]
    accepted = []
    for item in _ITEM.findall(header):
        main, _, rest = item.strip().partition(";")
        parameters = {
            name.lower(): value.strip().strip('"') for name, value in _PARAMETER.findall(";" + rest)
        }
        try:
            quality = float(parameters.get("q", "1"))
        except ValueError:
            quality = 0.0
        main = main.strip().lower()
        if main in ("*/*", "multipart/*"):
            # RFC 9110 12.5.1: a range that covers multipart/related accepts its default form,
            # as an absent Accept header does (browsers, curl and requests send "*/*").
            accepted.append(AcceptedType("*/*", parameters.get("transfer-syntax"), True, quality))
        elif main == "multipart/related":
            part_type = parameters.get("type", "*/*").lower()
            accepted.append(
                AcceptedType(
                    _ALIASES.get(part_type, part_type),
                    parameters.get("transfer-syntax"),
                    True,
                    quality,
                )
            )
        elif main:
            accepted.append(
                AcceptedType(
                    _ALIASES.get(main, main), parameters.get("transfer-syntax"), False, quality
                )
            )
    return sorted((a for a in accepted if a.quality > 0), key=lambda a: -a.quality)


def matches(accepted: str, offered: str) -> bool:
    if accepted in ("*/*", offered):
        return True
    kind, _, sub = accepted.partition("/")
    return sub == "*" and offered.startswith(kind + "/")


def can_transcode(stored: str, target: str) -> bool:
    if target == stored:
        return True
    source = UID(stored)
    if target not in TRANSCODE_TARGETS or not source.is_transfer_syntax:
        return False
    # pydicom writes little endian only; a retired big endian source would need byte swapping.
    if not source.is_little_endian or source == "1.2.840.10008.1.2.1.99":
        return False
    if source.is_encapsulated:
        from pydicom.pixels import get_decoder

        try:
            if not get_decoder(source).is_available:
                return False
        except (NotImplementedError, ValueError):
            return False
    if UID(target).is_encapsulated:
        from pydicom.pixels import get_encoder

        return get_encoder(target).is_available
    return True


def instance_transfer_syntax(accepted: list[AcceptedType], stored: str) -> str:
    """The transfer syntax of ``application/dicom`` parts for a stored syntax (PS3.18 8.7.3.5).

    ``transfer-syntax=*`` and ``*/*`` take the stored syntax; ``application/dicom`` without
    the parameter means Explicit VR Little Endian (PS3.18 Table 8.7.3-?, the default).
    """
    for a in accepted:
        if not a.multipart or not matches(a.media_type, DICOM):
            continue
        if a.transfer_syntax == "*" or (a.transfer_syntax is None and a.media_type != DICOM):
            return stored
        target = a.transfer_syntax or ExplicitVRLittleEndian
        if can_transcode(stored, target):
            return target
    raise NotAcceptable(
        f"cannot send an instance stored as {stored} in any accepted representation "
        f"(this server transcodes to {', '.join(TRANSCODE_TARGETS)})"
    )


def frame_media_type(stored: str) -> str:
    return FRAME_MEDIA_TYPES.get(stored, OCTET_STREAM)


@dataclass(frozen=True)
class FrameRepresentation:
    """How frames are sent: the part's media type, whether the stored bytes are decoded to
    native pixels first, and the transfer-syntax parameter of the part (None: none)."""

    media_type: str
    decode: bool
    transfer_syntax: str | None

    @property
    def part_type(self) -> str:
        if self.transfer_syntax is None:
            return self.media_type
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"


def frame_representation(accepted: list[AcceptedType], stored: str) -> FrameRepresentation:
    """Frames as stored (their own media type, PS3.18 Table 8.7.3-2), as stored but labelled
    application/octet-stream when asked with ``transfer-syntax=*`` (what OHIF asks for), or
    decoded to native little endian (application/octet-stream, PS3.18 8.7.3.3.2)."""
    as_stored = frame_media_type(stored)
    as_is = as_stored != OCTET_STREAM or UID(stored).is_little_endian
    for a in accepted:
        if not a.multipart:
            continue
        if a.transfer_syntax == "*" and matches(a.media_type, as_stored):
            return FrameRepresentation(as_stored, False, stored)
        if a.transfer_syntax == "*" and matches(a.media_type, OCTET_STREAM):
            return FrameRepresentation(OCTET_STREAM, False, stored)
        if as_is and matches(a.media_type, as_stored) and a.transfer_syntax in (None, stored):
            # Native frames are plain octet-stream, as the decoded ones are.
            return FrameRepresentation(
                as_stored, False, None if as_stored == OCTET_STREAM else stored
            )
        if matches(a.media_type, OCTET_STREAM) and a.transfer_syntax in (
            None,
            ExplicitVRLittleEndian,
        ):
            return FrameRepresentation(OCTET_STREAM, True, None)
    raise NotAcceptable(
        f"frames stored as {stored} are available as {as_stored} or {OCTET_STREAM} only"
    )
