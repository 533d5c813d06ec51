"""DIMSE command sets (PS3.7 9.3, 10.3, Annex E): encoded and decoded by Hilum itself.

A command set is a handful of group 0000 elements, always implicit VR little endian (PS3.7
6.3.1), so a table of their VRs and two small loops replace a pydicom Dataset per message.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from typing import Any

from server.dimse.pdu import AbortReason, ProtocolError


class CommandField(enum.IntEnum):
    """PS3.7 E.1-1, Command Field (0000,0100)."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    C_CANCEL_RQ = 0x0FFF
    N_SET_RQ = 0x0120
    N_SET_RSP = 0x8120
    N_CREATE_RQ = 0x0140
    N_CREATE_RSP = 0x8140


# PS3.7 E.1-1: Command Data Set Type (0000,0800) 0x0101 means no data set; any other, one.
NO_DATA_SET = 0x0101
DATA_SET_PRESENT = 0x0000
# PS3.7 9.1.1.1.6 etc.: Priority MEDIUM.
PRIORITY_MEDIUM = 0x0000

# PS3.7 Table E.1-1 / E.2-1: tag -> (keyword, VR) of every command element Hilum reads or writes.
ELEMENTS: dict[int, tuple[str, str]] = {
    0x00000000: ("CommandGroupLength", "UL"),
    0x00000002: ("AffectedSOPClassUID", "UI"),
    0x00000003: ("RequestedSOPClassUID", "UI"),
    0x00000100: ("CommandField", "US"),
    0x00000110: ("MessageID", "US"),
    0x00000120: ("MessageIDBeingRespondedTo", "US"),
    0x00000600: ("MoveDestination", "AE"),
    0x00000700: ("Priority", "US"),
    0x00000800: ("CommandDataSetType", "US"),
    0x00000900: ("Status", "US"),
    0x00000901: ("OffendingElement", "AT"),
    0x00000902: ("ErrorComment", "LO"),
    0x00000903: ("ErrorID", "US"),
    0x00001000: ("AffectedSOPInstanceUID", "UI"),
    0x00001001: ("RequestedSOPInstanceUID", "UI"),
    0x00001020: ("NumberOfRemainingSuboperations", "US"),
    0x00001021: ("NumberOfCompletedSuboperations", "US"),
    0x00001022: ("NumberOfFailedSuboperations", "US"),
    0x00001023: ("NumberOfWarningSuboperations", "US"),
    0x00001030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x00001031: ("MoveOriginatorMessageID", "US"),
}
TAGS: dict[str, int] = {keyword: tag for tag, (keyword, _vr) in ELEMENTS.items()}
_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
# A command set is some 100-200 bytes; anything far larger is not one.
MAX_COMMAND_SET = 64 * 1024


class Command(dict[str, Any]):
    """A decoded command set: keyword -> value (str, int, or a list of int for AT)."""

    @property
    def field(self) -> int:
        return int(self.get("CommandField", -1))

    @property
    def has_data_set(self) -> bool:
        return int(self.get("CommandDataSetType", NO_DATA_SET)) != NO_DATA_SET


def encode_command(values: Mapping[str, Any]) -> bytes:
    """The command set of ``values`` (keywords of :data:`ELEMENTS`), in tag order, with its
    Command Group Length (PS3.7 E.1-1)."""
    body = []
    for keyword in sorted(values, key=TAGS.__getitem__):
        value = values[keyword]
        if value is None or keyword == "CommandGroupLength":
            continue
        tag = TAGS[keyword]
        encoded = _encode_value(ELEMENTS[tag][1], value)
        body.append(_ELEMENT_HEADER.pack(0, tag & 0xFFFF, len(encoded)) + encoded)
    data = b"".join(body)
    return _ELEMENT_HEADER.pack(0, 0, 4) + _UL.pack(len(data)) + data


def decode_command(data: bytes) -> Command:
    """Decode a command set; raise ProtocolError when it is not one. Elements Hilum does not
    know are skipped (PS3.7 E.1: retired and other command elements)."""
    command = Command()
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _ELEMENT_HEADER.size:
            raise _malformed("truncated element header")
        group, element, length = _ELEMENT_HEADER.unpack_from(data, offset)
        offset += _ELEMENT_HEADER.size
        if group != 0 or length > end - offset:
            raise _malformed(f"element ({group:04X},{element:04X}) of {length} bytes")
        known = ELEMENTS.get(element)
        if known is not None:
            keyword, vr = known
            command[keyword] = _decode_value(vr, data[offset : offset + length])
        offset += length
    if "CommandField" not in command:
        raise _malformed("no Command Field")
    return command


def _malformed(detail: str) -> ProtocolError:
    return ProtocolError(
        f"malformed command set: {detail}", AbortReason.INVALID_PDU_PARAMETER_VALUE
    )


def _encode_value(vr: str, value: Any) -> bytes:
    if vr == "US":
        return _US.pack(int(value))
    if vr == "UL":
        return _UL.pack(int(value))
    if vr == "AT":
        tags = value if isinstance(value, list | tuple) else [value]
        return b"".join(struct.pack("<HH", int(t) >> 16, int(t) & 0xFFFF) for t in tags)
    text = str(value).encode("ascii", "replace")
    if len(text) % 2:
        # PS3.5 6.2: UI values are padded with NUL, the others with a space.
        text += b"\x00" if vr == "UI" else b" "
    return text


def _decode_value(vr: str, raw: bytes) -> Any:
    try:
        if vr == "US":
            return _US.unpack(raw)[0]
        if vr == "UL":
            return _UL.unpack(raw)[0]
        if vr == "AT":
            return [(g << 16) | e for g, e in struct.iter_unpack("<HH", raw)]
    except struct.error as error:
        raise _malformed(f"{vr} value of {len(raw)} bytes") from error
    return raw.decode("ascii", "replace").rstrip("\x00 ").lstrip(" ")
