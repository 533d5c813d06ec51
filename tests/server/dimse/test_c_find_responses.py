"""Pending C-FIND responses written in batches (server/dimse/c_find_responses.py) against real
SCUs: many batches, fragments within a small peer maximum PDU length, both little endian
transfer syntaxes, pydicom's encoding for the others, DCMTK's findscu reading it all."""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind as FIND,
)

from server.dimse.ae import DimseServer
from server.dimse.association import Association, Context
from server.dimse.c_find_responses import BATCH_BYTES, PendingResponses
from server.dimse.identifier import query_request
from server.dimse.pdu import PduSocket, p_data
from tests.conftest import BACKENDS, running_dimse, shared_archive
from tests.server.dimse.qr_seed import FIND_SCU, qr_associate
from tests.server.dimse.scu import echo_works
from tests.server.dimse.test_c_find import MANY, _seed_many_studies

PATIENT_ID = "PAT-MANY"
EXPECTED_UIDS = {f"1.2.826.0.1.3680043.8.498.78.{i}" for i in range(MANY)}


@pytest.fixture(scope="module", params=BACKENDS)
def many(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DimseServer]:
    """One server per backend pair for the whole module over MANY studies, seeded once: every
    test here only queries (a cancelled query included)."""
    directory = tmp_path_factory.mktemp("many")
    with shared_archive(request.param, request, directory) as (settings, archive):
        _seed_many_studies(archive, PATIENT_ID)
        with running_dimse(settings, archive) as server:
            yield server


def query() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = PATIENT_ID
    ds.PatientName = ""
    ds.StudyInstanceUID = ""
    ds.StudyDescription = ""
    ds.RetrieveAETitle = ""
    return ds


def find(server: DimseServer, transfer_syntax: str, max_pdu: int) -> list[tuple[int, Dataset]]:
    ae = AE(ae_title="PYNETDICOM")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(FIND, [transfer_syntax])
    assoc = qr_associate(server, ae)
    try:
        responses = [(int(status.Status), ds) for status, ds in assoc.send_c_find(query(), FIND)]
    finally:
        assoc.release()
    return responses


@pytest.mark.parametrize(
    "transfer_syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian], ids=["ivr", "evr"]
)
@pytest.mark.parametrize("max_pdu", [0, 64, 16382], ids=["unlimited", "64", "16382"])
def test_every_match_arrives_over_many_batches_and_pdus(
    many: DimseServer, transfer_syntax: str, max_pdu: int
) -> None:
    """PDUs of 64 bytes split the command set and every Identifier into several fragments."""
    responses = find(many, transfer_syntax, max_pdu)
    assert [status for status, _ in responses] == [0xFF00] * MANY + [0x0000]
    uids = [str(ds.StudyInstanceUID) for _, ds in responses[:-1]]
    assert set(uids) == EXPECTED_UIDS and len(uids) == MANY
    for _, ds in responses[:-1]:
        assert str(ds.PatientID) == PATIENT_ID and str(ds.PatientName) == "MANY^STUDIES"
        assert ds.QueryRetrieveLevel == "STUDY"
        assert ds.RetrieveAETitle == many.settings.dimse.ae_title
        assert "StudyDescription" in ds and not ds.StudyDescription
    implicit_vr = transfer_syntax == ImplicitVRLittleEndian
    identifiers = sum(len(encode(ds, implicit_vr, True)) for _, ds in responses[:-1])
    assert identifiers > 2 * BATCH_BYTES  # several batches' worth (test_batches_are_bounded)


def test_big_endian_identifiers_are_encoded_by_pydicom_and_batched(many: DimseServer) -> None:
    """A transfer syntax the fast encoder does not serve: pydicom encodes each Identifier,
    and the responses still leave in batches; same answers."""
    responses = find(many, ExplicitVRBigEndian, 16382)
    assert [status for status, _ in responses] == [0xFF00] * MANY + [0x0000]
    assert {str(ds.StudyInstanceUID) for _, ds in responses[:-1]} == EXPECTED_UIDS
    assert echo_works(many)


def test_findscu_reads_every_batch(many: DimseServer, tmp_path: Path) -> None:
    result = subprocess.run(
        [FIND_SCU, "-S", "-aec", many.settings.dimse.ae_title, "--max-pdu", "4096",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={PATIENT_ID}", "-k", "PatientName",
         "-k", "StudyInstanceUID", "-X", "-od", str(tmp_path), "127.0.0.1", str(many.port)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    files = sorted(tmp_path.glob("rsp*.dcm"))
    uids = {str(pydicom.dcmread(path).StudyInstanceUID) for path in files}
    assert len(files) == MANY and uids == EXPECTED_UIDS


def test_c_cancel_between_batches_answers_cancel(many: DimseServer) -> None:
    """C-CANCEL after the first response arrived: Cancel, and the association serves on.

    Under load the SCP may have sent every match before the cancel reaches it; the cancel of a
    request already answered is then ignored (PS3.7 9.3.2.3) and the find ends in Success. That
    exchange is tried again, up to five times: one of them must end in Cancel."""
    for _attempt in range(5):
        ae = AE()
        ae.add_requested_context(FIND)
        assoc = qr_associate(many, ae)
        try:
            statuses = []
            for status, _ in assoc.send_c_find(query(), FIND, msg_id=9):
                statuses.append(int(status.Status))
                if len(statuses) == 1:
                    context_id = assoc.accepted_contexts[0].context_id
                    assoc.send_c_cancel(9, context_id)
            second = [int(status.Status) for status, _ in assoc.send_c_find(query(), FIND)]
        finally:
            assoc.release()
        assert second == [0xFF00] * MANY + [0x0000]
        if statuses[-1] != 0x0000:
            break
        assert statuses == [0xFF00] * MANY + [0x0000]  # all sent before the cancel arrived
    assert statuses[-1] == 0xFE00, statuses[-3:]
    assert set(statuses[:-1]) == {0xFF00} and len(statuses) - 1 < MANY
    assert echo_works(many)


@pytest.mark.parametrize("max_pdu", [0, 7, 64, 200], ids=lambda n: f"max-pdu-{n}")
def test_p_data_tf_framing(max_pdu: int) -> None:
    """PS3.8 9.3.5 / E.2: one PDV per PDU, within the peer's maximum length, fragments of
    the command set (0x01 ... 0x03) and of the Identifier (0x00 ... 0x02) in order."""
    command, identifiers = bytes(range(90)), [b"A" * 150, b"B" * 2, b"C" * 57]
    stream = b"".join(
        p_data(5, command, command=True, max_pdu=max_pdu)
        + p_data(5, identifier, command=False, max_pdu=max_pdu)
        for identifier in identifiers
    )
    messages, fragments, offset = [], b"", 0
    while offset < len(stream):
        pdu_type, _, length = struct.unpack_from(">BBI", stream, offset)
        item_length, context_id, control = struct.unpack_from(">IBB", stream, offset + 6)
        assert pdu_type == 0x04 and context_id == 5 and item_length + 4 == length
        assert max_pdu == 0 or length <= max_pdu
        fragments += stream[offset + 12 : offset + 6 + length]
        offset += 6 + length
        if control & 2:
            messages.append((control, fragments))
            fragments = b""
        else:
            assert control in (0x00, 0x01)
    expected = [(0x03, command), (0x02, identifiers[0]), (0x03, command), (0x02, identifiers[1])]
    assert messages == [*expected, (0x03, command), (0x02, identifiers[2])]


def _drain(peer: socket.socket) -> bytes:
    """What has arrived at the peer's end so far (no wait)."""
    chunks = []
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        chunks.append(chunk)


def _messages(data: bytes, max_pdu: int) -> list[tuple[bool, bytes]]:
    """(is a command set, bytes) of each message in a stream of P-DATA-TF PDUs, each PDU
    checked against the peer's maximum length (PS3.8 9.3.5, E.2)."""
    messages: list[tuple[bool, bytes]] = []
    fragments = b""
    offset = 0
    while offset < len(data):
        pdu_type, _, length = struct.unpack_from(">BBI", data, offset)
        assert pdu_type == 0x04 and (not max_pdu or length <= max_pdu)
        pdv_length, _context_id, control = struct.unpack_from(">IBB", data, offset + 6)
        assert pdv_length + 4 == length  # one PDV per PDU
        fragments += data[offset + 12 : offset + 6 + length]
        if control & 0x02:  # the last fragment of a message
            messages.append((bool(control & 0x01), fragments))
            fragments = b""
        offset += 6 + length
    assert offset == len(data) and not fragments
    return messages


@pytest.mark.parametrize("max_pdu", [0, 64, 16382], ids=["unlimited", "64", "16382"])
def test_batches_are_bounded(max_pdu: int) -> None:
    """The SCP's writes, as they arrive at the other end of a real socket: several, each of
    many responses (not one write per response), none much over BATCH_BYTES, and together
    every response in order, within the peer's PDUs."""
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    context = Context(1, FIND, ImplicitVRLittleEndian)
    assoc = Association(
        PduSocket(ours, idle_timeout=10, pdu_timeout=10), [context],
        calling_ae_title="FINDSCU", called_ae_title="HILUM", peer_address="127.0.0.1",
        max_pdu_receive=0, max_pdu_send=max_pdu,
    )  # fmt: skip
    request = query_request(query(), FIND, case_insensitive_person_names=True)
    rows = [
        {"PatientID": PATIENT_ID, "PatientName": "MANY^STUDIES", "StudyInstanceUID": uid}
        for uid in sorted(EXPECTED_UIDS)
    ]
    responses = PendingResponses(assoc, context, 7, request, "HILUM")
    writes: list[bytes] = []
    try:
        for row in rows:
            responses.add(row)
            if arrived := _drain(peer):
                writes.append(arrived)
        responses.flush()
        writes.append(_drain(peer))
    finally:
        ours.close()
        peer.close()

    assert 2 < len(writes) < len(rows) / 10
    assert max(map(len, writes)) < 2 * BATCH_BYTES
    messages = _messages(b"".join(writes), max_pdu)
    assert [is_command for is_command, _ in messages] == [True, False] * len(rows)
    uids = [str(decode(BytesIO(data), True, True).StudyInstanceUID) for _, data in messages[1::2]]
    assert uids == [row["StudyInstanceUID"] for row in rows]
