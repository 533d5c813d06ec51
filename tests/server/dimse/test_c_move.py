"""C-MOVE SCP: movescu and pynetdicom to DCMTK's storescp and to pynetdicom peers."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
)

from config import Settings
from config.settings import DimsePeer
from server.dimse.ae import DimseServer
from storage.archive import Archive
from storage.query import Query, QueryLevel, locate_instances
from tests.conftest import free_port
from tests.factories import data_set_differences
from tests.server.dimse.qr_seed import (
    MOVE_SCU,
    REFUSED_RETRIEVES,
    STUDIES,
    CountingBlobStore,
    identifier_of,
    ingest_compressed,
    ingest_new_instance,
    qr_associate,
    seed_archive,
    sop_classes_of,
    storescp,
    study_identifier,
)
from tests.server.dimse.scu import accepted_context_id, echo_works

MOVE = StudyRootQueryRetrieveInformationModelMove
MOVE_MODELS = {"PATIENT_ROOT": PatientRootQueryRetrieveInformationModelMove, "STUDY_ROOT": MOVE}


class Peers:
    """Ports of the Move Destinations known to the server under test."""

    def __init__(self) -> None:
        self.ports = {title: free_port() for title in ("STORESCP", "EXPLICIT", "CT_ONLY", "SLOW")}
        self.ports["REFUSER"] = free_port()
        self.ports["DOWN"] = free_port()  # nothing listens there

    def config(self) -> list[dict[str, object]]:
        return [
            {"ae_title": title, "host": "127.0.0.1", "port": port}
            for title, port in self.ports.items()
        ]


@pytest.fixture
def peers() -> Peers:
    return Peers()


@pytest.fixture
def move_server(settings: Settings, archive: Archive, peers: Peers) -> Iterator[DimseServer]:
    with running_move_server(settings, archive, peers) as server:
        yield server


@contextlib.contextmanager
def running_move_server(
    settings: Settings, archive: Archive, peers: Peers
) -> Iterator[DimseServer]:
    configured = [DimsePeer.model_validate(peer) for peer in peers.config()]
    dimse = settings.dimse.model_copy(update={"peers": configured})
    server = DimseServer(settings.model_copy(update={"dimse": dimse}), archive)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def move(
    server: DimseServer, identifier: Dataset, destination: str, model: str = MOVE
) -> list[Dataset]:
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(model)
    assoc = qr_associate(server, ae)
    try:
        return [status for status, _ in assoc.send_c_move(identifier, destination, model)]
    finally:
        assoc.release()


class PynetdicomPeer:
    """A Storage SCP accepting only ``syntaxes`` for ``sop_classes``; keeps what it receives
    and the Message IDs of the C-STORE requests; ``abort``: aborts the association on the
    first C-STORE instead of answering it."""

    def __init__(
        self, port: int, sop_classes: list[str], syntaxes: list[str], *, abort: bool = False
    ) -> None:
        self.received: list[Dataset] = []
        self.message_ids: list[int] = []
        self.abort = abort
        self.first_received = threading.Event()
        self.release = threading.Event()
        self.release.set()
        ae = AE()
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, syntaxes)
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        self.message_ids.append(int(event.request.MessageID))
        self.first_received.set()
        if self.abort:
            event.assoc.abort()
            return 0x0000  # never sent
        self.release.wait(30)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def test_movescu_to_storescp_receives_the_study_as_stored(
    move_server: DimseServer, archive: Archive, peers: Peers, tmp_path: Path
) -> None:
    files = seed_archive(archive, tmp_path / "sent")
    study = STUDIES[0]
    with storescp(tmp_path / "received", "STORESCP", peers.ports["STORESCP"], "+xa") as received:
        result = subprocess.run(
            [MOVE_SCU, "-d", "-S", "-aec", "HILUM", "-aem", "STORESCP",
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.uid}",
             "127.0.0.1", str(move_server.port)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        arrived = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in received.iterdir()}
    expected = {uid for series in study.series for uid in series.instances}
    assert set(arrived) == expected
    for uid, path in arrived.items():
        assert data_set_differences(pydicom.dcmread(files[uid]), pydicom.dcmread(path)) == []
    assert "DIMSE Status                  : 0x0000" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("model", "level", "keys"),
    [
        (MOVE, "SERIES", {"StudyInstanceUID": STUDIES[0].uid,
                          "SeriesInstanceUID": STUDIES[0].series[0].uid}),
        (PatientRootQueryRetrieveInformationModelMove, "PATIENT", {"PatientID": "PAT-1"}),
        (PatientRootQueryRetrieveInformationModelMove, "IMAGE",
         {"PatientID": "PAT-4", "StudyInstanceUID": STUDIES[4].uid,
          "SeriesInstanceUID": STUDIES[4].series[0].uid,
          "SOPInstanceUID": STUDIES[4].series[0].instances[1]}),
    ],
    ids=["study-root-series", "patient-root-patient", "patient-root-image"],
)  # fmt: skip
def test_move_at_each_level(
    move_server: DimseServer,
    archive: Archive,
    peers: Peers,
    tmp_path: Path,
    model: str,
    level: str,
    keys: dict[str, str],
) -> None:
    seed_archive(archive, tmp_path / "sent")
    expected = {
        uid
        for study in STUDIES
        for series in study.series
        for uid in series.instances
        if keys.get("PatientID", study.patient.patient_id) == study.patient.patient_id
        and keys.get("StudyInstanceUID", study.uid) == study.uid
        and keys.get("SeriesInstanceUID", series.uid) == series.uid
        and keys.get("SOPInstanceUID", uid) == uid
    }
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    with storescp(tmp_path / "received", "STORESCP", peers.ports["STORESCP"], "+xa") as received:
        statuses = move(move_server, identifier, "STORESCP", model)
        arrived = {str(pydicom.dcmread(p).SOPInstanceUID) for p in received.iterdir()}
    assert arrived == expected
    final = statuses[-1]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == len(expected)
    # Pending responses count the sub-operations down (PS3.4 C.4.2.1.5).
    remaining = [int(s.NumberOfRemainingSuboperations) for s in statuses[:-1]]
    assert remaining == list(range(len(expected) - 1, -1, -1))


def test_peer_accepting_only_explicit_vr_little_endian_receives_decoded_pixels(
    move_server: DimseServer, archive: Archive, peers: Peers, tmp_path: Path
) -> None:
    study_uid, files = ingest_compressed(archive, tmp_path)
    peer = PynetdicomPeer(peers.ports["EXPLICIT"], sop_classes_of(list(files.values())),
                          [ExplicitVRLittleEndian])  # fmt: skip
    try:
        statuses = move(move_server, study_identifier(study_uid), "EXPLICIT")
    finally:
        peer.stop()
    assert statuses[-1].Status == 0x0000, statuses[-1]
    assert {str(ds.SOPInstanceUID) for ds in peer.received} == set(files)
    # Each transcoded while the previous was sent: the Message IDs still follow one another.
    first = peer.message_ids[0]
    assert peer.message_ids == list(range(first, first + len(files)))
    for ds in peer.received:
        original = pydicom.dcmread(files[str(ds.SOPInstanceUID)])
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, original.pixel_array)
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "Rows", "Columns"):
            assert ds.get(keyword) == original.get(keyword), keyword


def data_set_bytes(path: Path) -> bytes:
    """The bytes after a Part 10 file's File Meta Information, whose length its first
    element, (0002,0000) File Meta Information Group Length, gives (PS3.10 7.1)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:138] == b"\x02\x00\x00\x00UL"
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]


def test_peer_accepting_compressed_syntaxes_receives_them_as_stored(
    settings: Settings, archive: Archive, peers: Peers, tmp_path: Path
) -> None:
    """Sent from the stored blob, never read into memory: the server's in-memory limit is one
    byte, which refuses any instance it would read whole, and the data sets arrive byte for
    byte as stored (storescp +B writes them as they came)."""
    study_uid, files = ingest_compressed(archive, tmp_path)
    configured = [DimsePeer.model_validate(peer) for peer in peers.config()]
    unreadable = settings.model_copy(
        update={
            "dimse": settings.dimse.model_copy(update={"peers": configured}),
            "server": settings.server.model_copy(update={"transcode_max_bytes": 1}),
        }
    )
    server = DimseServer(unreadable, archive)
    server.start()
    try:
        with storescp(
            tmp_path / "received", "STORESCP", peers.ports["STORESCP"], "+xa", "+B"
        ) as got:
            statuses = move(server, study_identifier(study_uid), "STORESCP")
            arrived = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in got.iterdir()}
    finally:
        server.stop()
    assert statuses[-1].Status == 0x0000
    assert set(arrived) == set(files)
    for uid, path in arrived.items():
        ds, original = pydicom.dcmread(path), pydicom.dcmread(files[uid])
        assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert data_set_bytes(path) == data_set_bytes(files[uid])
    assert list(server.tmp_dir.glob("retrieve-*")) == []  # each spooled file is removed


def test_partial_failure_ends_with_b000_and_the_failed_uids(
    move_server: DimseServer, archive: Archive, peers: Peers, tmp_path: Path
) -> None:
    """The peer takes CT only: the MR instance of the study fails, the CT instances arrive."""
    seed_archive(archive, tmp_path / "sent")
    study = STUDIES[0]
    peer = PynetdicomPeer(peers.ports["CT_ONLY"], [CTImageStorage], [ExplicitVRLittleEndian])
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(MOVE)
    assoc = qr_associate(move_server, ae)
    try:
        responses = list(assoc.send_c_move(study_identifier(study.uid), "CT_ONLY", MOVE))
    finally:
        assoc.release()
        peer.stop()
    status, identifier = responses[-1]
    mr = study.series[1].instances
    assert status.Status == 0xB000
    assert status.NumberOfFailedSuboperations == len(mr)
    assert status.NumberOfCompletedSuboperations == len(study.series[0].instances)
    failed = identifier.FailedSOPInstanceUIDList
    assert ([failed] if isinstance(failed, str) else list(failed)) == list(mr)
    assert {str(ds.SOPInstanceUID) for ds in peer.received} == set(study.series[0].instances)


def test_unknown_destination_is_refused_with_a801(
    move_server: DimseServer, archive: Archive, tmp_path: Path
) -> None:
    seed_archive(archive, tmp_path / "sent")
    statuses = move(move_server, study_identifier(STUDIES[0].uid), "NOBODY")
    assert [int(s.Status) for s in statuses] == [0xA801]
    assert echo_works(move_server)


def test_destination_refusing_the_association_gives_a801(
    move_server: DimseServer, archive: Archive, peers: Peers, tmp_path: Path
) -> None:
    seed_archive(archive, tmp_path / "sent")
    ae = AE(ae_title="REFUSER")
    ae.add_supported_context(CTImageStorage)
    ae.require_calling_aet = ["SOMEONE_ELSE"]
    refuser = ae.start_server(("127.0.0.1", peers.ports["REFUSER"]), block=False)
    try:
        statuses = move(move_server, study_identifier(STUDIES[0].uid), "REFUSER")
    finally:
        refuser.shutdown()
    assert [int(s.Status) for s in statuses] == [0xA801]
    assert echo_works(move_server)


@pytest.mark.parametrize(("model", "keys"), REFUSED_RETRIEVES.values(), ids=REFUSED_RETRIEVES)
def test_identifier_without_a_usable_unique_key_is_refused_with_a900(
    move_server: DimseServer, archive: Archive, peers: Peers, tmp_path: Path, model: str, keys: dict
) -> None:
    """PS3.4 C.4.2.2.1: nothing is sent, whatever the archive holds."""
    seed_archive(archive, tmp_path / "sent")
    with storescp(tmp_path / "received", "STORESCP", peers.ports["STORESCP"], "+xa") as received:
        statuses = move(move_server, identifier_of(keys), "STORESCP", MOVE_MODELS[model])
        assert not list(received.iterdir())
    assert [int(s.Status) for s in statuses] == [0xA900] and statuses[-1].ErrorComment
    # Refused before any sub-operation: the final response counts none (PS3.4 C.4.2.1.5).
    assert "NumberOfFailedSuboperations" not in statuses[-1]
    assert echo_works(move_server)


def test_refusal_to_an_unreachable_destination_is_answered_a900(
    move_server: DimseServer, peers: Peers
) -> None:
    """The Identifier is checked before Hilum associates with the destination: a bad one is
    answered 0xA900 even when nothing listens there (docs/conformance.md)."""
    statuses = move(move_server, identifier_of({"QueryRetrieveLevel": "STUDY"}), "DOWN")
    assert [int(s.Status) for s in statuses] == [0xA900]
    assert echo_works(move_server)


def test_keys_other_than_unique_keys_are_not_matched(
    move_server: DimseServer, archive: Archive, peers: Peers, tmp_path: Path
) -> None:
    """PS3.4 C.4.2.2.1: only unique keys select what a retrieve sends."""
    seed_archive(archive, tmp_path / "sent")
    study = STUDIES[0]
    identifier = study_identifier(study.uid)
    identifier.PatientName = "NOBODY^ELSE"
    identifier.AccessionNumber = "NO-SUCH-ACC"
    identifier.Modality = "XA"
    with storescp(tmp_path / "received", "STORESCP", peers.ports["STORESCP"], "+xa") as received:
        statuses = move(move_server, identifier, "STORESCP")
        arrived = {str(pydicom.dcmread(p).SOPInstanceUID) for p in received.iterdir()}
    assert arrived == {uid for series in study.series for uid in series.instances}
    assert statuses[-1].Status == 0x0000


def test_unique_key_above_the_retrieve_level_is_matched(
    move_server: DimseServer, archive: Archive, peers: Peers, tmp_path: Path
) -> None:
    """Patient Root, STUDY level: the study of PAT-1 asked under PAT-2's ID matches nothing."""
    seed_archive(archive, tmp_path / "sent")
    identifier = study_identifier(STUDIES[0].uid)
    identifier.PatientID = STUDIES[2].patient.patient_id
    statuses = move(move_server, identifier, "STORESCP", MOVE_MODELS["PATIENT_ROOT"])
    assert [int(s.Status) for s in statuses] == [0x0000]
    assert statuses[-1].NumberOfCompletedSuboperations == 0


def test_instances_ingested_or_deleted_during_a_move(
    move_server: DimseServer, archive: Archive, peers: Peers, tmp_path: Path
) -> None:
    """The instances counted are those sent: one ingested meanwhile is not sent, one whose
    blob was deleted meanwhile is a failed sub-operation in the Failed SOP Instance UID List."""
    seed_archive(archive, tmp_path / "sent")
    study = STUDIES[0]
    peer = PynetdicomPeer(peers.ports["SLOW"], sop_classes_of(list((tmp_path / "sent").iterdir())),
                          [ExplicitVRLittleEndian])  # fmt: skip
    peer.release.clear()
    deleted = study.series[1].instances[0]
    outcome: list[str] = []

    def change_the_study() -> None:
        assert peer.first_received.wait(30)
        located = locate_instances(archive, image_query(deleted))
        archive.blobs.delete(next(located).blob_key)
        located.close()
        outcome.append(ingest_new_instance(archive, study, tmp_path / "new"))
        peer.release.set()

    changer = threading.Thread(target=change_the_study)
    changer.start()
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(MOVE)
    assoc = qr_associate(move_server, ae)
    try:
        responses = list(assoc.send_c_move(study_identifier(study.uid), "SLOW", MOVE))
    finally:
        assoc.release()
        changer.join()
        peer.release.set()
        peer.stop()
    status, identifier = responses[-1]
    assert status.Status == 0xB000
    assert status.NumberOfFailedSuboperations == 1
    assert status.NumberOfCompletedSuboperations == study.instance_count - 1
    failed = identifier.FailedSOPInstanceUIDList
    assert ([failed] if isinstance(failed, str) else list(failed)) == [deleted]
    received = {str(ds.SOPInstanceUID) for ds in peer.received}
    assert received == {uid for series in study.series for uid in series.instances} - {deleted}
    assert outcome and outcome[0] not in received


def image_query(sop_instance_uid: str) -> Query:
    return Query(level=QueryLevel.IMAGE, matching={"SOPInstanceUID": sop_instance_uid})


def test_c_cancel_stops_a_move(
    settings: Settings, archive: Archive, peers: Peers, tmp_path: Path
) -> None:
    """The peer holds its first C-STORE until the SCU has sent C-CANCEL. The second instance,
    opened meanwhile to be sent next, is closed unsent."""
    seed_archive(archive, tmp_path / "sent")
    study = STUDIES[0]
    blobs = CountingBlobStore(archive.blobs)
    peer = PynetdicomPeer(peers.ports["SLOW"], sop_classes_of(list((tmp_path / "sent").iterdir())),
                          [ExplicitVRLittleEndian])  # fmt: skip
    peer.release.clear()
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(MOVE)
    counted = dataclasses.replace(archive, blobs=blobs)
    with running_move_server(settings, counted, peers) as move_server:
        assoc = qr_associate(move_server, ae)
        try:
            responses = assoc.send_c_move(study_identifier(study.uid), "SLOW", MOVE, msg_id=9)
            canceller = threading.Thread(target=_cancel_after_first_store, args=(assoc, peer))
            canceller.start()
            statuses = [status for status, _ in responses]
            canceller.join()
        finally:
            assoc.release()  # answered once the C-MOVE is done with
            peer.release.set()
            peer.stop()
        assert echo_works(move_server)
    final = statuses[-1]
    assert final.Status == 0xFE00
    assert final.NumberOfCompletedSuboperations == 1
    assert final.NumberOfRemainingSuboperations == study.instance_count - 1
    assert len(peer.received) == 1
    assert (blobs.opened, blobs.closed) == (2, 2)


def test_destination_lost_fails_the_remaining_sub_operations(
    settings: Settings, archive: Archive, peers: Peers, tmp_path: Path
) -> None:
    """The Move Destination aborts on the first C-STORE: it and every later sub-operation
    fail, each listed (PS3.4 C.4.2.3.1), and the instance opened to be sent next is closed."""
    seed_archive(archive, tmp_path / "sent")
    study = STUDIES[0]
    blobs = CountingBlobStore(archive.blobs)
    peer = PynetdicomPeer(peers.ports["SLOW"], sop_classes_of(list((tmp_path / "sent").iterdir())),
                          [ExplicitVRLittleEndian], abort=True)  # fmt: skip
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(MOVE)
    counted = dataclasses.replace(archive, blobs=blobs)
    with running_move_server(settings, counted, peers) as move_server:
        assoc = qr_associate(move_server, ae)
        try:
            responses = list(assoc.send_c_move(study_identifier(study.uid), "SLOW", MOVE))
        finally:
            assoc.release()
            peer.stop()
        assert echo_works(move_server)
    status, identifier = responses[-1]
    assert status.Status == 0xA702
    assert status.NumberOfFailedSuboperations == study.instance_count
    assert status.NumberOfCompletedSuboperations == 0
    failed = identifier.FailedSOPInstanceUIDList
    assert set([failed] if isinstance(failed, str) else failed) == {
        uid for series in study.series for uid in series.instances
    }
    assert len(peer.received) == 1
    assert (blobs.opened, blobs.closed) == (2, 2)


def _cancel_after_first_store(assoc: object, peer: PynetdicomPeer) -> None:
    assert peer.first_received.wait(30)
    context_id = accepted_context_id(assoc, MOVE)  # type: ignore[arg-type]
    assoc.send_c_cancel(9, context_id)  # type: ignore[attr-defined]
    # Give the C-CANCEL a head start on the C-STORE response it must overtake.
    threading.Event().wait(0.5)
    peer.release.set()
