"""Property (issue 17): whatever bytes a peer sends, Hilum's Upper Layer reader (PS3.8 9) either
decodes them or ends the association with :class:`AssociationEnded` (an A-ABORT with a reason,
or the peer gone); never another exception, never a wait past its deadline, and never memory in
proportion to a length field the peer wrote. The reader runs over a real socket pair; the
inputs are valid PDUs mutated and spliced the ways a broken or hostile peer would."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from server.dimse.association import Association, Context
from server.dimse.commands import CommandField, decode_command, encode_command
from server.dimse.negotiation import read_association_request
from server.dimse.pdu import (
    COMMAND_BIT,
    LAST_BIT,
    AssociationEnded,
    PduSocket,
    ProtocolError,
    release_request,
)

DEADLINE_S = 0.5  # the reader's idle and PDU timeouts in these tests
# What one example may allocate at its peak: the reader's 64 KiB buffer, a 64 KiB command set,
# the decoded PDU objects. Length fields announce up to 4 GiB.
PEAK_BYTES = 1 << 20
FUZZ = settings(max_examples=200, deadline=5000, derandomize=True, database=None)


def _association_request() -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID("1.2.840.10008.3.1.1.1")
    primitive.calling_ae_title, primitive.called_ae_title = "FUZZ", "HILUM"
    context = build_context(Verification, [ImplicitVRLittleEndian])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _pdv(context_id: int, control: int, fragment: bytes) -> bytes:
    item = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBI", 4, 0, len(item)) + item


def _echo_messages() -> bytes:
    command = encode_command(
        {
            "AffectedSOPClassUID": Verification,
            "CommandField": CommandField.C_ECHO_RQ,
            "MessageID": 1,
            "CommandDataSetType": 0x0101,
        }
    )
    store = encode_command(
        {
            "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "CommandField": CommandField.C_STORE_RQ,
            "MessageID": 2,
            "AffectedSOPInstanceUID": "1.2.3",
            "CommandDataSetType": 0x0000,
            "Priority": 0,
        }
    )
    return (
        _pdv(1, COMMAND_BIT | LAST_BIT, command)
        + _pdv(1, COMMAND_BIT, store[:10])
        + _pdv(1, COMMAND_BIT | LAST_BIT, store[10:])
        + _pdv(1, 0, b"\x08\x00\x16\x00" + b"\x00" * 60)
        + _pdv(1, LAST_BIT, b"")
        + release_request()
    )


SEEDS = [_association_request(), _echo_messages()]

_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 12), st.integers(0, 255)),
    st.tuples(
        st.just("length"),
        st.integers(0, 1 << 12),
        st.sampled_from([0, 1, 2, 5, 6, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]),
    ),
    st.tuples(st.just("cut"), st.integers(0, 1 << 12), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 12), st.integers(0, 255)),
    st.tuples(st.just("header"), st.integers(0, 1 << 12), st.integers(0, 255)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        at = where % max(1, len(out))
        if kind == "flip" and at < len(out):
            out[at] = value
        elif kind == "length" and at + 4 <= len(out):
            out[at : at + 4] = struct.pack(">L", value)
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = bytes([value]) * 6
        elif kind == "header":  # a PDU header of any type announcing a short body
            out[at:at] = struct.pack(">BBI", value % 9, 0, value)
    return bytes(out)


def _read_from_peer(data: bytes, read: Callable[[PduSocket], Any]) -> tuple[float, int]:
    """Run ``read`` on a socket whose peer sent ``data`` and closed its side; the seconds it
    took and its peak allocation. Anything but a return or :class:`AssociationEnded`
    propagates. (The peers that go silent instead are test_hostile_pdus'.)"""
    ours, theirs = socket.socketpair()

    def send() -> None:
        with contextlib.suppress(OSError):
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    wire = PduSocket(ours, idle_timeout=DEADLINE_S, pdu_timeout=DEADLINE_S)
    tracemalloc.start()
    started = time.monotonic()
    try:
        read(wire)
    except AssociationEnded:
        pass
    finally:
        took = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        ours.close()
        sender.join(5)
        theirs.close()
    return took, peak


def _messages(wire: PduSocket) -> None:
    association = Association(
        wire,
        [Context(1, Verification, ImplicitVRLittleEndian)],
        calling_ae_title="FUZZ",
        called_ae_title="HILUM",
        peer_address="127.0.0.1",
        max_pdu_receive=16384,
        max_pdu_send=16384,
    )
    for _ in range(8):
        if association.receive_message(idle_timeout=DEADLINE_S) is None:
            return


def _bounded(took: float, peak: int) -> None:
    # Every wait ends at a deadline: a few of them at most, never the peer's choice.
    assert took < 8 * DEADLINE_S + 1, took
    assert peak < PEAK_BYTES, peak


# pynetdicom's codec says so of a mutated UID, and goes on.
@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
@FUZZ
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_any_first_pdu_is_an_association_request_or_ends_the_association(
    mutations: list[tuple[str, int, int]],
) -> None:
    data = _mutate(SEEDS[0], mutations)
    _bounded(*_read_from_peer(data, lambda wire: read_association_request(wire, DEADLINE_S)))


@FUZZ
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_any_p_data_stream_is_messages_or_ends_the_association(
    mutations: list[tuple[str, int, int]],
) -> None:
    _bounded(*_read_from_peer(_mutate(SEEDS[1], mutations), _messages))


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
@FUZZ
@given(data=st.binary(max_size=2048))
def test_any_bytes_at_all_end_the_association_or_are_read(data: bytes) -> None:
    _bounded(*_read_from_peer(data, _messages))
    _bounded(*_read_from_peer(data, lambda wire: read_association_request(wire, DEADLINE_S)))


@settings(max_examples=500, deadline=1000, derandomize=True, database=None)
@given(
    elements=st.lists(
        st.tuples(
            st.integers(0, 3),  # group, mostly 0
            st.sampled_from([0x0000, 0x0002, 0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900,
                             0x1000, 0x1020, 0x1030, 0x1031, 0x4711]),
            st.one_of(st.binary(max_size=70), st.just(b"")),
            st.sampled_from([None, 0, 1, 0xFFFFFFFF, 0x7FFFFFFF]),
        ),
        max_size=10,
    )
)  # fmt: skip
def test_any_command_set_is_decoded_or_refused_as_a_protocol_error(
    elements: list[tuple[int, int, bytes, int | None]],
) -> None:
    data = b"".join(
        struct.pack("<HHI", group, element, len(value) if length is None else length) + value
        for group, element, value, length in elements
    )
    try:
        command = decode_command(data)
    except ProtocolError:
        return
    assert "CommandField" in command
