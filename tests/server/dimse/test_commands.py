"""DIMSE command sets (server/dimse/commands.py) against pydicom's and pynetdicom's encoding."""

from __future__ import annotations

from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_MOVE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_MOVE, C_STORE
from pynetdicom.dsutils import decode, encode

from server.dimse.commands import CommandField, decode_command, encode_command
from server.dimse.pdu import ProtocolError

CT = "1.2.840.10008.5.1.4.1.1.2"


def test_encoded_command_set_reads_back_with_pydicom() -> None:
    """PS3.7 E.1-1: group 0000 in implicit VR little endian, Command Group Length first."""
    values = {
        "AffectedSOPClassUID": CT,  # odd length: padded with a NUL
        "CommandField": CommandField.C_STORE_RSP,
        "MessageIDBeingRespondedTo": 42,
        "CommandDataSetType": 0x0101,
        "Status": 0xA700,
        "ErrorComment": "disk full",  # odd length: padded with a space
        "AffectedSOPInstanceUID": "1.2.3.4",
    }
    encoded = encode_command(values)
    command = decode(BytesIO(encoded), True, True)
    assert command.CommandGroupLength == len(encoded) - 12  # after its own element
    for keyword, value in values.items():
        assert command[keyword].value == value, keyword
    assert decode_command(encoded) == {**values, "CommandGroupLength": len(encoded) - 12}


def test_pynetdicom_command_sets_decode() -> None:
    request = C_MOVE()
    request.MessageID, request.AffectedSOPClassUID = 7, "1.2.840.10008.5.1.4.1.2.2.2"
    request.MoveDestination = "STORESCP"
    request.Priority = 0
    request.Identifier = BytesIO(b"\x00\x00")
    message = C_MOVE_RQ()
    message.primitive_to_message(request)
    command = decode_command(bytes(encode(message.command_set, True, True)))
    assert command.field == CommandField.C_MOVE_RQ and command.has_data_set
    assert command["MoveDestination"] == "STORESCP" and command["MessageID"] == 7

    response = C_STORE()
    response.MessageIDBeingRespondedTo, response.Status = 3, 0
    response.AffectedSOPClassUID, response.AffectedSOPInstanceUID = CT, "1.2.3"
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    command = decode_command(bytes(encode(message.command_set, True, True)))
    assert command.field == CommandField.C_STORE_RSP and not command.has_data_set
    assert (command["Status"], command["AffectedSOPInstanceUID"]) == (0, "1.2.3")


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x00\x04\x00\x00",  # truncated element header
        b"\x00\x00\x10\x01\x02\x00\x00\x00\x30\x00",  # Message ID, no Command Field
        b"\x00\x00\x00\x01\xff\x00\x00\x00",  # value longer than the set
        b"\x08\x00\x00\x01\x02\x00\x00\x00\x30\x00",  # not group 0000
    ],
    ids=["truncated", "no-command-field", "overlong", "wrong-group"],
)
def test_malformed_command_sets_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_command(data)
