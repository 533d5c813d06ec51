"""A C-STORE-RQ whose data set streams from a stored file (C-MOVE, C-GET): a file that cannot be
read further once part of the message is on the wire aborts the association (PS3.8 9.3.5: only
the rest of that message may follow), and one that fails before is a failed sub-operation on an
association that goes on. What arrives is read from the other end of a real socket; the stored
file is a stand-in that fails after a given number of bytes, as a disk or an S3 connection may."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from server.dimse.association import Association, Context
from server.dimse.commands import CommandField
from server.dimse.pdu import A_ABORT, COMMAND_BIT, LAST_BIT, P_DATA_TF, MessageBroken, PduSocket

CT = "1.2.840.10008.5.1.4.1.1.2"
MAX_PDU = 16384  # DCMTK's tools' default


class FailingFile:
    """``size`` bytes, then an OSError (EIO) on the next read."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise OSError(5, "Input/output error")
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"\x00" * n

    def close(self) -> None:
        pass


class WholeFile(FailingFile):
    """``size`` bytes, then the end of the file."""

    def read(self, n: int = -1) -> bytes:
        return super().read(n) if self.left > 0 else b""


def _send(stream: FailingFile) -> tuple[Exception | None, list[tuple[int, bytes]], Association]:
    """Send one C-STORE-RQ whose data set is read from ``stream``; (what the send raised, the
    PDUs the peer received until the connection ended or went quiet, the association)."""
    ours, peer = socket.socketpair()
    context = Context(1, CT, ExplicitVRLittleEndian)
    assoc = Association(
        PduSocket(ours, idle_timeout=10, pdu_timeout=10), [context],
        calling_ae_title="HILUM", called_ae_title="STORESCP", peer_address="127.0.0.1",
        max_pdu_receive=0, max_pdu_send=MAX_PDU,
    )  # fmt: skip
    received = bytearray()

    def drain() -> None:
        peer.settimeout(2)
        try:
            while chunk := peer.recv(1 << 16):
                received.extend(chunk)
        except TimeoutError:
            pass  # the association still open: nothing more was sent

    reader = threading.Thread(target=drain)
    reader.start()
    command = {
        "AffectedSOPClassUID": CT,
        "CommandField": CommandField.C_STORE_RQ,
        "MessageID": 1,
        "Priority": 0,
        "AffectedSOPInstanceUID": "1.2.3.4",
    }
    raised: Exception | None = None
    try:
        assoc.send_message_stream(context, command, stream)  # type: ignore[arg-type]
    except Exception as error:  # noqa: BLE001 - what it raises is the test's subject
        raised = error
    reader.join()
    ours.close()
    peer.close()
    pdus = []
    at = 0
    while at < len(received):
        pdu_type, _, length = struct.unpack_from(">BBL", received, at)
        pdus.append((pdu_type, bytes(received[at + 6 : at + 6 + length])))
        at += 6 + length
    return raised, pdus, assoc


def _pdvs(pdus: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
    """(message control header, value length) of each PDV of the P-DATA-TF PDUs (PS3.8
    9.3.5.1, E.2)."""
    pdvs = []
    for pdu_type, body in pdus:
        at = 0
        while pdu_type == P_DATA_TF and at < len(body):
            (length,) = struct.unpack_from(">L", body, at)
            pdvs.append((body[at + 5], length - 2))
            at += 4 + length
    return pdvs


def test_a_file_that_fails_mid_message_aborts_the_association() -> None:
    raised, pdus, assoc = _send(FailingFile(2 << 20))  # several batches of PDUs on the wire
    assert isinstance(raised, MessageBroken), raised
    assert "Input/output error" in str(raised)
    assert not assoc.is_open
    types = [pdu_type for pdu_type, _ in pdus]
    assert types[-1] == A_ABORT and set(types[:-1]) == {P_DATA_TF}, types[:3]
    flags = [flag for flag, _length in _pdvs(pdus)]
    # The command set whole, then data set fragments of which none is the last one.
    assert flags[0] == COMMAND_BIT | LAST_BIT
    assert len(flags) > 1 and all(flag == 0 for flag in flags[1:])


def test_a_file_that_fails_before_anything_is_sent_leaves_the_association_open() -> None:
    raised, pdus, assoc = _send(FailingFile(1000))  # within the first batch: nothing sent yet
    assert isinstance(raised, OSError) and not isinstance(raised, MessageBroken), raised
    assert pdus == []
    assert assoc.is_open


@pytest.mark.parametrize("size", [0, 1, MAX_PDU, 3 << 20])
def test_a_readable_file_is_sent_whole_and_its_last_fragment_flagged(size: int) -> None:
    raised, pdus, assoc = _send(WholeFile(size))
    assert raised is None
    assert assoc.is_open
    assert {pdu_type for pdu_type, _ in pdus} == {P_DATA_TF}
    pdvs = _pdvs(pdus)
    assert pdvs[0][0] == COMMAND_BIT | LAST_BIT
    data = pdvs[1:]
    assert [flag for flag, _ in data] == [0] * (len(data) - 1) + [LAST_BIT]
    assert sum(length for _, length in data) == size
    assert all(length <= MAX_PDU - 6 for _, length in data)
