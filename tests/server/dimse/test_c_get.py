"""C-GET SCP with SCP/SCU Role Selection: DCMTK's getscu and pynetdicom."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)

from server.dimse.ae import DimseServer
from storage.archive import Archive
from tests.factories import data_set_differences
from tests.server.dimse.qr_seed import (
    GET_SCU,
    STUDIES,
    ingest_compressed,
    seed_archive,
    sop_classes_of,
    study_identifier,
)
from tests.server.dimse.scu import echo_works

GET = StudyRootQueryRetrieveInformationModelGet


def get(
    server: DimseServer,
    identifier: Dataset,
    storage: dict[str, list[str]],
    model: str = GET,
) -> tuple[list[Dataset], list[Dataset]]:
    """C-GET with the SCU as Storage SCP for ``storage`` (SOP class -> transfer syntaxes)."""
    received: list[Dataset] = []

    def store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

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
    try:
        statuses = [status for status, _ in assoc.send_c_get(identifier, model)]
    finally:
        assoc.release()
    return statuses, received


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
    statuses, received = get(
        dimse_server, study_identifier(study.uid), {CTImageStorage: [ExplicitVRLittleEndian]}
    )
    final = statuses[-1]
    assert final.Status == 0xB000
    assert final.NumberOfFailedSuboperations == len(study.series[1].instances)
    assert {str(ds.SOPInstanceUID) for ds in received} == set(study.series[0].instances)
    assert echo_works(dimse_server)


def test_malformed_identifier_is_refused_with_a900(
    dimse_server: DimseServer, archive: Archive, tmp_path: Path
) -> None:
    seed_archive(archive, tmp_path / "sent")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "VOLUME"
    identifier.StudyInstanceUID = STUDIES[0].uid
    statuses, received = get(dimse_server, identifier, {CTImageStorage: [ExplicitVRLittleEndian]})
    assert int(statuses[-1].Status) == 0xA900 and statuses[-1].ErrorComment
    assert received == []
    assert echo_works(dimse_server)
