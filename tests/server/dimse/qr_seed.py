"""Seed data for the Query/Retrieve tests, described as plain records so that every test can
compute its expected answers from them without calling the code under test."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from config import Settings
from server.dimse.ae import DimseServer
from storage.archive import Archive
from storage.blobs import PRIMARY_TIER, BlobStore, BlobStream
from storage.ingest import ingest_file
from tests.conftest import free_port, running_dimse, shared_archive
from tests.factories import ct_instance, write_part10

FIND_SCU = "/usr/bin/findscu"
MOVE_SCU = "/usr/bin/movescu"
GET_SCU = "/usr/bin/getscu"
STORE_SCP = "/usr/bin/storescp"
SOP_CLASS_OF = {"CT": CTImageStorage, "MR": MRImageStorage}
# pydicom's compressed test files: JPEG baseline (YBR), JPEG 2000, RLE.
COMPRESSED_FILES = ("SC_rgb_jpeg_gdcm.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm")


@dataclass(frozen=True)
class SeedPatient:
    patient_id: str
    name: str
    birth_date: str
    sex: str


@dataclass(frozen=True)
class SeedSeries:
    uid: str
    modality: str
    number: int
    instances: tuple[str, ...]  # SOP Instance UIDs


@dataclass(frozen=True)
class SeedStudy:
    uid: str
    patient: SeedPatient
    date: str
    time: str
    accession: str
    description: str
    series: tuple[SeedSeries, ...]

    @property
    def modalities(self) -> set[str]:
        return {s.modality for s in self.series}

    @property
    def instance_count(self) -> int:
        return sum(len(s.instances) for s in self.series)


def _uid(*parts: int) -> str:
    return "1.2.826.0.1.3680043.8.498.77." + ".".join(map(str, parts))


JANE = SeedPatient("PAT-1", "DOE^JANE", "19700101", "F")
JOHN = SeedPatient("PAT-2", "Doe^John", "19801231", "M")
ANNA = SeedPatient("PAT-3", "SMITH^ANNA", "19650615", "F")
HANS = SeedPatient("PAT-4", "MÜLLER^HANS", "19590302", "M")
PATIENTS = (JANE, JOHN, ANNA, HANS)


def _series(study: int, number: int, modality: str, count: int) -> SeedSeries:
    instances = tuple(_uid(study, number, i + 1) for i in range(count))
    return SeedSeries(_uid(study, number), modality, number, instances)


STUDIES = (
    SeedStudy(
        _uid(1), JANE, "20260110", "081500", "ACC-100", "CT CHEST",
        (_series(1, 1, "CT", 2), _series(1, 2, "MR", 1)),
    ),
    SeedStudy(_uid(2), JANE, "20260131", "235959", "ACC-101", "MR HEAD",
              (_series(2, 1, "MR", 1),)),
    SeedStudy(_uid(3), JOHN, "20260201", "120000", "ACC-200", "CT ABDOMEN",
              (_series(3, 1, "CT", 1),)),
    SeedStudy(_uid(4), ANNA, "20251231", "070000", "ACC-300", "CT CHEST",
              (_series(4, 1, "CT", 1),)),
    SeedStudy(_uid(5), HANS, "20260215", "093000", "ACC-400", "MR KNEE",
              (_series(5, 1, "MR", 2),)),
)  # fmt: skip


def seed_datasets() -> Iterator[Dataset]:
    for study in STUDIES:
        for series in study.series:
            for number, sop_uid in enumerate(series.instances, start=1):
                ds = ct_instance(study.uid, series.uid, sop_uid, size=8, seed=number - 1)
                ds.SOPClassUID = SOP_CLASS_OF[series.modality]
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                ds.Modality = series.modality
                ds.SeriesNumber = series.number
                ds.PatientID = study.patient.patient_id
                ds.PatientName = study.patient.name
                ds.PatientBirthDate = study.patient.birth_date
                ds.PatientSex = study.patient.sex
                ds.StudyDate, ds.StudyTime = study.date, study.time
                ds.AccessionNumber = study.accession
                ds.StudyDescription = study.description
                if not study.patient.name.isascii():
                    ds.SpecificCharacterSet = "ISO_IR 192"
                yield ds


def seed_archive(archive: Archive, directory: Path) -> dict[str, Path]:
    """Store every seed instance; SOP Instance UID -> the file as it was sent."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for ds in seed_datasets():
        path = write_part10(ds, directory / f"{ds.SOPInstanceUID}.dcm")
        ingest_file(archive, path)
        files[ds.SOPInstanceUID] = path
    return files


@dataclass
class SeededServer:
    server: DimseServer
    archive: Archive
    files: dict[str, Path]
    settings: Settings


@contextlib.contextmanager
def seeded_server(
    backend: str, request: pytest.FixtureRequest, directory: Path
) -> Iterator[SeededServer]:
    """A DIMSE server over an archive holding the seed, on one backend pair."""
    with contextlib.ExitStack() as stack:
        settings, archive = stack.enter_context(shared_archive(backend, request, directory))
        files = seed_archive(archive, directory / "sent")
        server = stack.enter_context(running_dimse(settings, archive))
        yield SeededServer(server, archive, files, settings)


def server_with(server: DimseServer, **sections: dict) -> DimseServer:
    """Another server over the same archive, with some settings changed and its own port."""
    settings = server.settings
    updates = {}
    for section, values in {"dimse": {}, **sections}.items():
        values = {"port": free_port(), **values} if section == "dimse" else values
        updates[section] = getattr(settings, section).model_copy(update=values)
    other = DimseServer(settings.model_copy(update=updates), server.archive)
    other.start()
    return other


def qr_associate(server: DimseServer, ae: AE) -> Association:
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.settings.dimse.ae_title)
    assert assoc.is_established, "the SCP refused the association"
    return assoc


@contextlib.contextmanager
def storescp(directory: Path, ae_title: str, port: int, *options: str) -> Iterator[Path]:
    """DCMTK's storescp writing what it receives under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [STORE_SCP, "-aet", ae_title, "-od", str(directory), *options, str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_for_port(port, process)
        yield directory
    finally:
        process.terminate()
        process.wait(10)


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"storescp exited: {process.stderr.read() if process.stderr else ''}"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"storescp did not listen on {port}")


# Identifiers a retrieve refuses with 0xA900 (PS3.4 C.4.2.2.1): id -> (model, keys). The unique
# key of the retrieve level must hold UIDs (or IDs), no wild card; the levels above, one value.
REFUSED_RETRIEVES: dict[str, tuple[str, dict[str, str]]] = {
    # pynetdicom cannot send an Identifier without any element; this is the nearest to it.
    "level-only": ("STUDY_ROOT", {"QueryRetrieveLevel": "STUDY"}),
    "missing-level": ("STUDY_ROOT", {"StudyInstanceUID": STUDIES[0].uid}),
    "non-unique-keys-only": ("STUDY_ROOT", {"QueryRetrieveLevel": "STUDY",
                                            "PatientName": "DOE^JANE", "StudyDate": ""}),
    "empty-study-uid": ("STUDY_ROOT", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}),
    "wildcard-study-uid": ("STUDY_ROOT", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "*"}),
    "wildcard-in-uid": ("STUDY_ROOT", {"QueryRetrieveLevel": "STUDY",
                                       "StudyInstanceUID": "1.2.*"}),
    "wildcard-patient-id": ("PATIENT_ROOT", {"QueryRetrieveLevel": "PATIENT",
                                             "PatientID": "PAT*"}),
    "no-series-uid": ("STUDY_ROOT", {"QueryRetrieveLevel": "SERIES",
                                     "StudyInstanceUID": STUDIES[0].uid}),
    "uid-list-above-level": ("STUDY_ROOT", {
        "QueryRetrieveLevel": "SERIES",
        "StudyInstanceUID": f"{STUDIES[0].uid}\\{STUDIES[1].uid}",
        "SeriesInstanceUID": STUDIES[0].series[0].uid}),
    "patient-level-in-study-root": ("STUDY_ROOT", {"QueryRetrieveLevel": "PATIENT",
                                                   "PatientID": "PAT-1"}),
}  # fmt: skip


def identifier_of(keys: dict[str, str]) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def ingest_new_instance(archive: Archive, study: SeedStudy, directory: Path) -> str:
    """One more CT instance in the first series of ``study``; its SOP Instance UID."""
    ds = next(d for d in seed_datasets() if d.StudyInstanceUID == study.uid)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    directory.mkdir(parents=True, exist_ok=True)
    ingest_file(archive, write_part10(ds, directory / f"{ds.SOPInstanceUID}.dcm"))
    return str(ds.SOPInstanceUID)


def study_identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    return ds


def sop_classes_of(files: list[Path]) -> list[str]:
    return sorted({str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files})


def ingest_compressed(archive: Archive, tmp_path: Path) -> tuple[str, dict[str, Path]]:
    """pydicom's compressed files, given one new study; SOP Instance UID -> file."""
    study_uid, files = generate_uid(), {}
    for name in COMPRESSED_FILES:
        ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / f"{name}"
        ds.save_as(path, enforce_file_format=True)
        ingest_file(archive, path)
        files[ds.SOPInstanceUID] = path
    return study_uid, files


class CountingBlobStore:
    """The real blob store, counting the streams it opened and those of them closed: a
    retrieve leaves none open, whatever ends it."""

    def __init__(self, inner: BlobStore) -> None:
        self._inner = inner
        self.opened = self.closed = 0

    def open(self, key: str, *, tier: str = PRIMARY_TIER) -> BlobStream:
        stream = self._inner.open(key, tier=tier)
        self.opened += 1
        return _CountedStream(stream, self)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


class _CountedStream:
    def __init__(self, inner: BlobStream, store: CountingBlobStore) -> None:
        self._inner, self._store, self._closed = inner, store, False

    def read(self, size: int = -1, /) -> bytes:
        return self._inner.read(size)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._store.closed += 1
        self._inner.close()

    def __enter__(self) -> _CountedStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
