"""C-GET SCP with SCP/SCU Role Selection: DCMTK's getscu and pynetdicom."""

from __future__ import annotations

import dataclasses
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)

from config import Settings
from server.dimse.ae import DimseServer
from storage.archive import Archive
from tests.conftest import running_dimse
from tests.factories import data_set_differences
from tests.server.dimse.qr_seed import (
    GET_SCU,
    REFUSED_RETRIEVES,
    STUDIES,
    CountingBlobStore,
    identifier_of,
    ingest_compressed,
    seed_archive,
    sop_classes_of,
    study_identifier,
)
from tests.server.dimse.scu import accepted_context_id, echo_works

GET = StudyRootQueryRetrieveInformationModelGet
GET_MODELS = {"PATIENT_ROOT": PatientRootQueryRetrieveInformationModelGet, "STUDY_ROOT": GET}


def get_association(
    server: DimseServer,
    storage: dict[str, list[str]],
    store: Callable[[evt.Event], int],
    model: str = GET,
) -> Association:
    """An association where the SCU is Storage SCP for ``storage`` (SOP class -> syntaxes)."""
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(model)
    roles = []
    for sop_class, syntaxes in storage.items():
        ae.add_requested_context(sop_class, syntaxes)
        roles.append(build_role(sop_class, scp_role=True))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(
        "127.0.0.1",
        server.port,
        ae_title=server.settings.dimse.ae_title,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, store)],
    )
    assert assoc.is_established
    return assoc


def get_responses(
    server: DimseServer,
    identifier: Dataset,
    storage: dict[str, list[str]],
    model: str = GET,
) -> tuple[list[tuple[Dataset, Dataset | None]], list[Dataset]]:
    """C-GET: every (status, identifier) response, and the data sets received."""
    received: list[Dataset] = []

    def store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    assoc = get_association(server, storage, store, model)
    try:
        responses = list(assoc.send_c_get(identifier, model))
    finally:
        assoc.release()
    return responses, received


def get(
    server: DimseServer,
    identifier: Dataset,
    storage: dict[str, list[str]],
    model: str = GET,
) -> tuple[list[Dataset], list[Dataset]]:
    """C-GET: the statuses of the responses, and the data sets received."""
    responses, received = get_responses(server, identifier, storage, model)
    return [status for status, _ in responses], received


@pytest.mark.parametrize(
    "proposed",
    [
        [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
        [ImplicitVRLittleEndian, ExplicitVRLittleEndian],
    ],
    ids=["explicit-first", "implicit-first"],
)
def test_the_get_scus_first_transfer_syntax_is_accepted_where_it_receives(
    dimse_server: DimseServer, proposed: list[str]
) -> None:
    """PS3.7 D.3.3.4: on a storage context where the SCU takes the SCP role, the receiver's
    preference decides (stored explicit VR then goes to getscu as stored); a storage context
    without Role Selection keeps Hilum's order, implicit VR first."""
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(GET)
    ae.add_requested_context(CTImageStorage, proposed)
    ae.add_requested_context(MRImageStorage, proposed)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    roles = [build_role(CTImageStorage, scp_role=True)]
    assoc = ae.associate("127.0.0.1", dimse_server.port, ae_title="HILUM", ext_neg=roles)
    assert assoc.is_established
    try:
        accepted = {c.abstract_syntax: c.transfer_syntax[0] for c in assoc.accepted_contexts}
    finally:
        assoc.release()
    assert accepted[CTImageStorage] == proposed[0]
    assert accepted[MRImageStorage] == ImplicitVRLittleEndian


def test_getscu_receives_the_study_as_stored(
    dimse_server: DimseServer, archive: Archive, tmp_path: Path
) -> None:
    files = seed_archive(archive, tmp_path / "sent")
    study = STUDIES[0]
    received = tmp_path / "received"
    received.mkdir()
    result = subprocess.run(
        [GET_SCU, "-d", "-S", "-aec", "HILUM", "-od", str(received),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.uid}",
         "127.0.0.1", str(dimse_server.port)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    arrived = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in received.iterdir()}
    assert set(arrived) == {uid for series in study.series for uid in series.instances}
    for uid, path in arrived.items():
        assert data_set_differences(pydicom.dcmread(files[uid]), pydicom.dcmread(path)) == []
    assert "DIMSE Status                  : 0x0000" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("model", "level", "keys"),
    [
        (GET, "SERIES", {"StudyInstanceUID": STUDIES[0].uid,
                         "SeriesInstanceUID": STUDIES[0].series[1].uid}),
        (PatientRootQueryRetrieveInformationModelGet, "PATIENT", {"PatientID": "PAT-1"}),
        (GET, "IMAGE", {"StudyInstanceUID": STUDIES[4].uid,
                        "SeriesInstanceUID": STUDIES[4].series[0].uid,
                        "SOPInstanceUID": STUDIES[4].series[0].instances[0]}),
    ],
    ids=["study-root-series", "patient-root-patient", "study-root-image"],
)  # fmt: skip
def test_get_at_each_level(
    dimse_server: DimseServer, archive: Archive, tmp_path: Path, model: str, level: str, keys: dict
) -> None:
    files = seed_archive(archive, tmp_path / "sent")
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
    storage = {CTImageStorage: [ExplicitVRLittleEndian], MRImageStorage: [ExplicitVRLittleEndian]}
    statuses, received = get(dimse_server, identifier, storage, model)
    assert statuses[-1].Status == 0x0000
    assert statuses[-1].NumberOfCompletedSuboperations == len(expected)
    assert {str(ds.SOPInstanceUID) for ds in received} == expected
    for ds in received:
        sent = pydicom.dcmread(files[str(ds.SOPInstanceUID)])
        assert data_set_differences(sent, ds) == []


def test_scu_accepting_only_explicit_vr_little_endian_receives_decoded_pixels(
    dimse_server: DimseServer, archive: Archive, tmp_path: Path
) -> None:
    study_uid, files = ingest_compressed(archive, tmp_path)
    storage = {
        sop_class: [ExplicitVRLittleEndian] for sop_class in sop_classes_of(list(files.values()))
    }
    statuses, received = get(dimse_server, study_identifier(study_uid), storage)
    assert statuses[-1].Status == 0x0000
    assert {str(ds.SOPInstanceUID) for ds in received} == set(files)
    for ds in received:
        original = pydicom.dcmread(files[str(ds.SOPInstanceUID)])
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, original.pixel_array)


def test_sop_class_without_a_storage_context_fails_its_sub_operations(
    dimse_server: DimseServer, archive: Archive, tmp_path: Path
) -> None:
    """The SCU offers CT only: the study's MR instance fails, with 0xB000 and its UID."""
    seed_archive(archive, tmp_path / "sent")
    study = STUDIES[0]
    responses, received = get_responses(
        dimse_server, study_identifier(study.uid), {CTImageStorage: [ExplicitVRLittleEndian]}
    )
    final, identifier = responses[-1]
    mr = study.series[1].instances
    assert final.Status == 0xB000
    assert final.NumberOfFailedSuboperations == len(mr)
    assert final.NumberOfCompletedSuboperations == len(study.series[0].instances)
    assert failed_uids(identifier) == list(mr)
    assert {str(ds.SOPInstanceUID) for ds in received} == set(study.series[0].instances)
    assert echo_works(dimse_server)


@pytest.mark.parametrize(("model", "keys"), REFUSED_RETRIEVES.values(), ids=REFUSED_RETRIEVES)
def test_identifier_without_a_usable_unique_key_is_refused_with_a900(
    dimse_server: DimseServer, archive: Archive, tmp_path: Path, model: str, keys: dict
) -> None:
    """PS3.4 C.4.2.2.1: nothing is sent, whatever the archive holds."""
    seed_archive(archive, tmp_path / "sent")
    storage = {CTImageStorage: [ExplicitVRLittleEndian], MRImageStorage: [ExplicitVRLittleEndian]}
    statuses, received = get(dimse_server, identifier_of(keys), storage, GET_MODELS[model])
    assert [int(s.Status) for s in statuses] == [0xA900] and statuses[-1].ErrorComment
    assert received == []
    assert echo_works(dimse_server)


def test_keys_other_than_unique_keys_are_not_matched(
    dimse_server: DimseServer, archive: Archive, tmp_path: Path
) -> None:
    """PS3.4 C.4.2.2.1: only unique keys select what a retrieve sends."""
    seed_archive(archive, tmp_path / "sent")
    study = STUDIES[0]
    identifier = study_identifier(study.uid)
    identifier.PatientName = "NOBODY^ELSE"
    identifier.StudyDate = "19000101"
    identifier.Modality = "XA"
    storage = {CTImageStorage: [ExplicitVRLittleEndian], MRImageStorage: [ExplicitVRLittleEndian]}
    statuses, received = get(dimse_server, identifier, storage)
    assert statuses[-1].Status == 0x0000
    assert {str(ds.SOPInstanceUID) for ds in received} == {
        uid for series in study.series for uid in series.instances
    }


def test_instance_too_large_to_transcode_fails_its_sub_operation(
    settings: Settings, archive: Archive, tmp_path: Path
) -> None:
    """Past the in-memory limit, a compressed instance is not decoded for an SCU that accepts
    only explicit VR little endian: every sub-operation fails (0xA702), each UID listed."""
    study_uid, files = ingest_compressed(archive, tmp_path)
    limited = settings.model_copy(
        update={"server": settings.server.model_copy(update={"transcode_max_bytes": 1024})}
    )
    storage = {
        sop_class: [ExplicitVRLittleEndian] for sop_class in sop_classes_of(list(files.values()))
    }
    server = DimseServer(limited, archive)
    server.start()
    try:
        responses, received = get_responses(server, study_identifier(study_uid), storage)
    finally:
        server.stop()
    final, identifier = responses[-1]
    assert final.Status == 0xA702
    assert final.NumberOfFailedSuboperations == len(files)
    assert sorted(failed_uids(identifier)) == sorted(files)
    assert received == []


def test_c_cancel_stops_a_get(settings: Settings, archive: Archive, tmp_path: Path) -> None:
    """The SCU holds its first C-STORE until it has sent C-CANCEL (PS3.4 C.4.3.3.1). The
    second instance, opened meanwhile to be sent next, is closed unsent."""
    seed_archive(archive, tmp_path / "sent")
    study = STUDIES[0]
    blobs = CountingBlobStore(archive.blobs)
    received: list[str] = []
    first_received, release = threading.Event(), threading.Event()

    def store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        first_received.set()
        release.wait(30)
        return 0x0000

    storage = {CTImageStorage: [ExplicitVRLittleEndian], MRImageStorage: [ExplicitVRLittleEndian]}
    with running_dimse(settings, dataclasses.replace(archive, blobs=blobs)) as dimse_server:
        assoc = get_association(dimse_server, storage, store)

        def cancel_after_first_store() -> None:
            assert first_received.wait(30)
            context_id = accepted_context_id(assoc, GET)
            assoc.send_c_cancel(9, context_id)
            # Give the C-CANCEL a head start on the C-STORE response it must overtake.
            threading.Event().wait(0.5)
            release.set()

        canceller = threading.Thread(target=cancel_after_first_store)
        try:
            responses = assoc.send_c_get(study_identifier(study.uid), GET, msg_id=9)
            canceller.start()
            statuses = [status for status, _ in responses]
            canceller.join()
        finally:
            release.set()
            assoc.release()  # answered once the C-GET is done with
        assert echo_works(dimse_server)
    final = statuses[-1]
    assert final.Status == 0xFE00
    assert final.NumberOfCompletedSuboperations == 1
    assert final.NumberOfRemainingSuboperations == study.instance_count - 1
    assert len(received) == 1
    assert (blobs.opened, blobs.closed) == (2, 2)


def failed_uids(identifier: Dataset | None) -> list[str]:
    assert identifier is not None, "no Failed SOP Instance UID List"
    failed = identifier.FailedSOPInstanceUIDList
    return [failed] if isinstance(failed, str) else list(failed)
