"""Modality Performed Procedure Step SCP (PS3.4 F.7) with pynetdicom as the modality: a step
COMPLETED whose images are all stored makes the study stable at once; the N-CREATE / N-SET
statuses of PS3.4 F.7.2."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import ModalityPerformedProcedureStep
from sqlalchemy import select

from config import Settings
from inference.stability import queue_stable_studies
from server.dimse.ae import DimseServer
from storage.archive import Archive
from storage.dicom_file import is_valid_uid
from storage.index.models import PerformedProcedureStep
from storage.ingest import ingest_file
from storage.jobs import utc_now
from tests.factories import ct_instance, write_part10
from tests.inference.test_jobs import CT_MODEL


@pytest.fixture(params=["sqlite-files"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def modality(settings: Settings, dimse_server: DimseServer) -> Iterator[Association]:
    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", dimse_server.port, ae_title=settings.dimse.ae_title)
    assert assoc.is_established
    yield assoc
    assoc.release()


def step(status: str, study: str, series: dict[str, list[str]] | None = None) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    scheduled = Dataset()
    scheduled.StudyInstanceUID = study
    ds.ScheduledStepAttributesSequence = [scheduled]
    if series is not None:
        items = []
        for series_uid, images in series.items():
            item = Dataset()
            item.SeriesInstanceUID = series_uid
            references = []
            for uid in images:
                reference = Dataset()
                reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
                reference.ReferencedSOPInstanceUID = uid
                references.append(reference)
            item.ReferencedImageSequence = references
            items.append(item)
        ds.PerformedSeriesSequence = items
    return ds


def scan(archive: Archive, settings: Settings) -> list:
    # Now: the quiet period (30 s) has not passed for any study.
    return queue_stable_studies(archive, settings, [CT_MODEL], now=utc_now() + timedelta(0))


def test_a_completed_step_makes_its_study_stable_once_its_images_are_stored(
    settings: Settings, archive: Archive, modality: Association, tmp_path: Path
) -> None:
    study, series = generate_uid(), generate_uid()
    images = [ct_instance(study, series, seed=n) for n in range(3)]
    uid = generate_uid()
    status, _ = modality.send_n_create(
        step("IN PROGRESS", study), ModalityPerformedProcedureStep, uid
    )
    assert status.Status == 0x0000
    for n, ds in enumerate(images[:2]):
        ingest_file(archive, write_part10(ds, tmp_path / f"{n}.dcm"))
    completed = step("COMPLETED", study, {series: [ds.SOPInstanceUID for ds in images]})
    status, _ = modality.send_n_set(completed, ModalityPerformedProcedureStep, uid)
    assert status.Status == 0x0000
    assert scan(archive, settings) == []  # 2 of the 3 images it performed are stored
    ingest_file(archive, write_part10(images[2], tmp_path / "2.dcm"))
    queued = scan(archive, settings)
    assert [(job.series_instance_uid, job.model_name) for job in queued] == [(series, "test-ct")]

    # PS3.4 F.7.2.2.2: a completed step may no longer be updated (0110, Error ID A710).
    status, _ = modality.send_n_set(completed, ModalityPerformedProcedureStep, uid)
    assert status.Status == 0x0110 and status.ErrorID == 0xA710


def test_n_create_and_n_set_statuses(
    settings: Settings, archive: Archive, modality: Association
) -> None:
    study, uid = generate_uid(), generate_uid()
    created = step("IN PROGRESS", study)
    assert modality.send_n_create(created, ModalityPerformedProcedureStep, uid)[0].Status == 0
    # PS3.7 C: 0111 Duplicate SOP Instance; 0112 No such object instance; 0106 Invalid value.
    assert modality.send_n_create(created, ModalityPerformedProcedureStep, uid)[0].Status == 0x0111
    unknown = modality.send_n_set(step("COMPLETED", study), ModalityPerformedProcedureStep,
                                  generate_uid())  # fmt: skip
    assert unknown[0].Status == 0x0112
    done = step("COMPLETED", study)
    refused = modality.send_n_create(done, ModalityPerformedProcedureStep, generate_uid())
    assert refused[0].Status == 0x0106
    odd = step("FINISHED", study)
    assert modality.send_n_set(odd, ModalityPerformedProcedureStep, uid)[0].Status == 0x0106
    # The SCP assigns the SOP Instance UID when the N-CREATE names none.
    status, _ = modality.send_n_create(created, ModalityPerformedProcedureStep)
    assert status.Status == 0
    with archive.index.read() as session:
        uids = session.scalars(select(PerformedProcedureStep.sop_instance_uid)).all()
    assert len(uids) == 2 and uid in uids and all(is_valid_uid(u) for u in uids)
