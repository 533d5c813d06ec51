"""Partitions and AE permissions over DIMSE, with DCMTK's storescu, findscu, movescu and getscu:
the Called AE Title selects the partition, the calling AE's permission says what it may do
there and from where (PS3.8 7.1.1.3, Table 9-21; PS3.8 Table 9-18; PS3.7 Annex C 0x0124)."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from config import Settings
from config.settings import ConfigError
from server.cli import main
from server.dimse.ae import DimseServer
from server.dimse.commands import CommandField
from server.dimse.negotiation import request_association
from storage.ae_permissions import AEPermissionEntry, set_ae_permission
from storage.archive import Archive, open_archive
from storage.move_destinations import MoveDestinationEntry, set_move_destination
from storage.partitions import create_partition
from storage.query import Query, QueryLevel, StoredInstance, locate_instances
from tests.conftest import free_port, make_settings, postgres_database, s3_blob_url
from tests.factories import DCMTK_STORESCU, ct_instance, write_part10
from tests.server.dimse.qr_seed import FIND_SCU, GET_SCU, MOVE_SCU, storescp
from tests.server.test_cli import hilum_env

# DCMTK and Hilum send each PDU at once (see server.dimse.association.configure_socket).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
PATIENT_ID = "PAT-7731"


def permission(title: str, partition: str, *services: str, networks: tuple[str, ...] = ()):
    return AEPermissionEntry(
        title, partition, "store" in services, "query" in services, "retrieve" in services,
        networks,
    )  # fmt: skip


@dataclass
class Tenants:
    """Two partitions, hosp-a (called AE HOSP_A) and hosp-b (HOSP_B), and who may do what."""

    server: DimseServer
    archive: Archive
    settings: Settings
    destination_port: int

    def run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV
        )

    def store(self, calling: str, called: str, files: list[Path]) -> subprocess.CompletedProcess:
        return self.run(DCMTK_STORESCU, "-v", "-aet", calling, "-aec", called, "127.0.0.1",
                        str(self.server.port), *map(str, files))  # fmt: skip

    def find(self, calling: str, called: str, study_uid: str, out: Path) -> list[str]:
        """Study Instance UIDs C-FIND answers (study level, Study Root)."""
        out.mkdir(parents=True, exist_ok=True)
        result = self.run(FIND_SCU, "-S", "-aet", calling, "-aec", called, "-X", "-od", str(out),
                          "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                          "127.0.0.1", str(self.server.port))  # fmt: skip
        assert result.returncode == 0, result.stderr
        return [str(pydicom.dcmread(p).StudyInstanceUID) for p in sorted(out.glob("rsp*.dcm"))]

    def move(self, calling: str, called: str, study_uid: str) -> subprocess.CompletedProcess:
        return self.run(MOVE_SCU, "-S", "-aet", calling, "-aec", called, "-aem", "DEST",
                        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                        "127.0.0.1", str(self.server.port))  # fmt: skip

    def get(self, calling: str, called: str, study_uid: str, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        result = self.run(GET_SCU, "-S", "-aet", calling, "-aec", called, "-od", str(out),
                          "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                          "127.0.0.1", str(self.server.port))  # fmt: skip
        assert result.returncode == 0, result.stderr
        return sorted(out.iterdir())


def located(archive: Archive, partition: str, study_uid: str) -> list[StoredInstance]:
    query = Query(level=QueryLevel.STUDY, matching={"StudyInstanceUID": study_uid})
    found = locate_instances(archive.scoped(partition), query)
    try:
        return list(found)
    finally:
        found.close()


def stored_in(archive: Archive, partition: str, study_uid: str) -> list[str]:
    return [instance.sop_instance_uid for instance in located(archive, partition, study_uid)]


def open_tenants(settings: Settings) -> tuple[DimseServer, Archive, int]:
    archive = open_archive(settings, migrate=True)
    index = archive.index
    create_partition(index, "hosp-a", ["HOSP_A"], reserved_ae_title="HILUM")
    create_partition(index, "hosp-b", ["HOSP_B"], reserved_ae_title="HILUM")
    for entry in (
        permission("MOD_A", "hosp-a", "store"),  # a modality: store only
        permission("WS_A", "hosp-a", "query", "retrieve"),
        permission("WS_B", "hosp-b", "store", "query", "retrieve"),
        permission("LAN_ONLY", "hosp-a", "store", "query", networks=("10.0.0.0/8",)),
        permission("LOOPBACK", "hosp-a", "query", networks=("127.0.0.0/8", "::1")),
        permission("MOVER", "hosp-a", "retrieve"),
    ):
        set_ae_permission(index, entry)
    port = free_port()
    set_move_destination(index, MoveDestinationEntry("DEST", "127.0.0.1", port))
    server = DimseServer(settings, archive)
    server.start()
    return server, archive, port


@pytest.fixture
def tenants(tmp_path: Path) -> Iterator[Tenants]:
    settings = make_settings(tmp_path, dimse={"require_called_ae_title": True})
    server, archive, port = open_tenants(settings)
    try:
        yield Tenants(server, archive, settings, port)
    finally:
        server.stop()
        archive.close()


def study_files(folder: Path, count: int = 2) -> tuple[str, list[Path]]:
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = [write_part10(ct_instance(study, series, seed=n, patient_id=PATIENT_ID),
                          folder / f"{n}.dcm") for n in range(count)]  # fmt: skip
    return study, files


def test_a_study_stored_in_one_partition_is_absent_from_the_other(
    tenants: Tenants, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    study, files = study_files(tmp_path / "study")
    stored = tenants.store("MOD_A", "HOSP_A", files)
    assert stored.returncode == 0, stored.stderr
    assert len(stored_in(tenants.archive, "hosp-a", study)) == 2
    assert stored_in(tenants.archive, "hosp-b", study) == []
    assert stored_in(tenants.archive, "default", study) == []

    # C-FIND: the study is found through hosp-a's AE title only.
    assert tenants.find("WS_A", "HOSP_A", study, tmp_path / "find-a") == [study]
    assert tenants.find("WS_B", "HOSP_B", study, tmp_path / "find-b") == []

    # C-GET: the instances come back through hosp-a only.
    assert len(tenants.get("WS_A", "HOSP_A", study, tmp_path / "get-a")) == 2
    assert tenants.get("WS_B", "HOSP_B", study, tmp_path / "get-b") == []

    # C-MOVE: hosp-b's request sends nothing; hosp-a's sends the study.
    with storescp(tmp_path / "dest", "DEST", tenants.destination_port) as received:
        refused = tenants.move("WS_B", "HOSP_B", study)
        assert refused.returncode == 0, refused.stderr
        assert list(received.iterdir()) == []
        moved = tenants.move("WS_A", "HOSP_A", study)
        assert moved.returncode == 0, moved.stderr
        arrived = {str(pydicom.dcmread(p).SOPInstanceUID) for p in received.iterdir()}
    assert arrived == set(stored_in(tenants.archive, "hosp-a", study))

    # A C-FIND on the patient's name and ID: found in hosp-a only; neither is logged at INFO.
    (tmp_path / "by-patient").mkdir()
    by_patient = tenants.run(FIND_SCU, "-S", "-aet", "WS_A", "-aec", "HOSP_A", "-X", "-od",
                             str(tmp_path / "by-patient"), "-k", "QueryRetrieveLevel=STUDY",
                             "-k", "PatientName=DOE^JANE", "-k", f"PatientID={PATIENT_ID}",
                             "127.0.0.1", str(tenants.server.port))  # fmt: skip
    assert by_patient.returncode == 0, by_patient.stderr
    assert len(list((tmp_path / "by-patient").glob("rsp*.dcm"))) == 1
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("keys PatientID,PatientName" in line for line in info), info
    assert not [line for line in info if "DOE" in line or PATIENT_ID in line]


def test_unknown_calling_ae_is_rejected_at_association(tenants: Tenants, tmp_path: Path) -> None:
    study, files = study_files(tmp_path / "study", 1)
    for calling, called in (("INTRUDER", "HOSP_A"), ("WS_A", "HOSP_B"), ("INTRUDER", "HILUM")):
        result = tenants.store(calling, called, files)
        assert result.returncode != 0
        # PS3.8 Table 9-21: rejected-permanent, service-user, calling-AE-title-not-recognized.
        assert "Association Rejected" in result.stderr, result.stderr
        assert "Calling AE Title Not Recognized" in result.stderr, result.stderr
    unknown_called = tenants.store("MOD_A", "NOBODY", files)
    assert "Called AE Title Not Recognized" in unknown_called.stderr, unknown_called.stderr
    for partition in ("hosp-a", "hosp-b", "default"):
        assert stored_in(tenants.archive, partition, study) == []


def test_store_only_ae_cannot_query_and_query_only_ae_cannot_store(
    tenants: Tenants, tmp_path: Path
) -> None:
    study, files = study_files(tmp_path / "study", 1)
    assert tenants.store("MOD_A", "HOSP_A", files).returncode == 0
    # The C-FIND contexts of a store-only AE are rejected at negotiation (PS3.8 Table 9-18).
    find = tenants.run(FIND_SCU, "-S", "-aet", "MOD_A", "-aec", "HOSP_A",
                       "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                       "127.0.0.1", str(tenants.server.port))  # fmt: skip
    assert find.returncode != 0
    assert "No Acceptable Presentation Contexts" in find.stderr, find.stderr
    # LOOPBACK may query only: its storage contexts are rejected as well.
    other_study, other_files = study_files(tmp_path / "other", 1)
    store = tenants.store("LOOPBACK", "HOSP_A", other_files)
    assert store.returncode != 0
    assert "No Acceptable Presentation Contexts" in store.stderr, store.stderr
    # WS_A may retrieve (its storage contexts serve C-GET) but not store: 0x0124.
    refused = tenants.store("WS_A", "HOSP_A", other_files)
    assert "Received Store Response (Unknown Status: 0x124)" in refused.stderr, refused.stderr
    assert stored_in(tenants.archive, "hosp-a", other_study) == []


def test_a_c_find_on_the_c_move_context_of_a_retrieve_only_ae_is_refused(
    tenants: Tenants, tmp_path: Path
) -> None:
    """The contexts decide most (PS3.8 Table 9-18); a request of another service sent on an
    accepted context is answered 0x0124, Refused: Not authorized (PS3.7 Annex C)."""
    study, files = study_files(tmp_path / "study", 1)
    assert tenants.store("MOD_A", "HOSP_A", files).returncode == 0
    assoc = request_association(
        "127.0.0.1", tenants.server.port, calling_ae_title="MOVER", called_ae_title="HOSP_A",
        contexts=[(StudyRootQueryRetrieveInformationModelMove, [ImplicitVRLittleEndian]),
                  (StudyRootQueryRetrieveInformationModelFind, [ImplicitVRLittleEndian])],
        max_pdu_length=16384, timeout=10,
    )  # fmt: skip
    try:
        assert [c.abstract_syntax for c in assoc.contexts.values()] == [
            StudyRootQueryRetrieveInformationModelMove  # the C-FIND context was rejected
        ]
        (context,) = assoc.contexts.values()
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study
        assoc.send_command(
            context,
            {"AffectedSOPClassUID": context.abstract_syntax, "MessageID": 1, "Priority": 0,
             "CommandField": CommandField.C_FIND_RQ},
            assoc.encode_data_set(context, identifier),
        )  # fmt: skip
        response = assoc.receive_message()
        assert response is not None and response.command.field == CommandField.C_FIND_RSP
        assert response.command["Status"] == 0x0124
    finally:
        assoc.release()


def test_an_address_outside_the_allowed_networks_is_rejected(
    tenants: Tenants, tmp_path: Path
) -> None:
    study, files = study_files(tmp_path / "study", 1)
    assert tenants.store("MOD_A", "HOSP_A", files).returncode == 0
    outside = tenants.store("LAN_ONLY", "HOSP_A", files)  # 10.0.0.0/8 only; we are 127.0.0.1
    assert "Calling AE Title Not Recognized" in outside.stderr, outside.stderr
    inside = tenants.find("LOOPBACK", "HOSP_A", study, tmp_path / "find")  # 127.0.0.0/8
    assert inside == [study]


def test_permissions_change_at_run_time_with_the_cli(
    tenants: Tenants, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """``hilum ae`` and ``hilum peers`` on the running server's index: the next association
    sees the change, no restart."""
    study, files = study_files(tmp_path / "study", 1)
    assert "Calling AE Title Not Recognized" in tenants.store("NEW_CT", "HOSP_B", files).stderr
    for name, value in hilum_env(tenants.settings).items():
        if name.startswith("HILUM_"):
            monkeypatch.setenv(name, value)

    def hilum(*args: str) -> subprocess.CompletedProcess:
        """The ``hilum`` command, in this process (its entry point: tests/server/test_cli)."""
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    added = hilum("ae", "add", "NEW_CT", "--partition", "hosp-b", "--store")
    assert added.returncode == 0, added.stderr
    assert "NEW_CT\thosp-b\tstore\tany address" in hilum("ae", "list").stdout
    assert tenants.store("NEW_CT", "HOSP_B", files).returncode == 0
    assert len(stored_in(tenants.archive, "hosp-b", study)) == 1

    assert hilum("ae", "remove", "NEW_CT").returncode == 0
    assert "Calling AE Title Not Recognized" in tenants.store("NEW_CT", "HOSP_B", files).stderr

    # C-MOVE reads its destinations from the index: one removed is unknown (0xA801).
    assert hilum("peers", "remove", "DEST").returncode == 0
    moved = tenants.move("WS_B", "HOSP_B", study)
    assert "Refused: MoveDestinationUnknown" in moved.stderr, moved.stderr
    # hosp-b reached through a second AE title, then no longer through its first.
    assert hilum("partitions", "add-ae-title", "hosp-b", "HOSP_B2").returncode == 0
    assert hilum("ae", "add", "NEW_CT", "--partition", "hosp-b", "--store").returncode == 0
    assert hilum("partitions", "remove-ae-title", "hosp-b", "HOSP_B").returncode == 0
    assert "hosp-b\tHOSP_B2\n" in hilum("partitions", "list").stdout
    assert tenants.store("NEW_CT", "HOSP_B2", files).returncode == 0
    assert "Called AE Title Not Recognized" in tenants.store("NEW_CT", "HOSP_B", files).stderr
    taken = hilum("partitions", "add-ae-title", "hosp-b", "HOSP_A")
    assert taken.returncode == 3 and "already partition hosp-a's" in taken.stderr

    wrong = hilum("partitions", "create", "Hosp C", "--ae-title", "HOSP_C")
    assert wrong.returncode == 2 and "not a valid partition name" in wrong.stderr


def test_partitions_isolate_on_postgresql_and_s3(tmp_path: Path, s3_server: object) -> None:
    with postgres_database() as url:
        settings = make_settings(tmp_path, database_url=url, blob_url=s3_blob_url(s3_server))
        server, archive, port = open_tenants(settings)
        tenants = Tenants(server, archive, settings, port)
        try:
            study, files = study_files(tmp_path / "study")
            assert tenants.store("WS_B", "HOSP_B", files).returncode == 0
            assert tenants.find("WS_B", "HOSP_B", study, tmp_path / "b") == [study]
            assert tenants.find("WS_A", "HOSP_A", study, tmp_path / "a") == []
            assert tenants.get("WS_A", "HOSP_A", study, tmp_path / "get-a") == []
            assert len(tenants.get("WS_B", "HOSP_B", study, tmp_path / "get-b")) == 2
            assert stored_in(archive, "hosp-a", study) == []
            # The same instances stored in hosp-a too: two copies, under other blob keys.
            assert tenants.store("MOD_A", "HOSP_A", files).returncode == 0
            keys = {
                p: {i.blob_key for i in located(archive, p, study)} for p in ("hosp-a", "hosp-b")
            }
            assert len(keys["hosp-a"]) == len(keys["hosp-b"]) == 2
            assert not keys["hosp-a"] & keys["hosp-b"]
            assert tenants.find("WS_A", "HOSP_A", study, tmp_path / "a2") == [study]
        finally:
            server.stop()
            archive.close()


def test_a_network_bound_scp_needs_ae_permissions_or_accept_any(tmp_path: Path) -> None:
    """Bound beyond loopback with no AE permission stored, the SCP refuses to start; a stored
    permission (or the seed of one), or accept_any_calling_ae, lets it."""
    loopback = make_settings(tmp_path)
    server = loopback.server.model_copy(update={"host": "0.0.0.0"})
    settings = loopback.model_copy(update={"server": server})
    archive = open_archive(settings, migrate=True)
    try:
        with pytest.raises(ConfigError, match="no calling AE titles are allowed"):
            DimseServer(settings, archive)
        DimseServer(settings.model_copy(update={"dimse": settings.dimse.model_copy(
            update={"accept_any_calling_ae": True})}), archive)  # fmt: skip
        set_ae_permission(archive.index, permission("CT", "default", "store"))
        DimseServer(settings, archive)
    finally:
        archive.close()
