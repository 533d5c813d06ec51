"""C-FIND SCP with DCMTK's findscu and pynetdicom, at every level of both information models.

The expected answers are computed here from the seed records (tests/server/dimse/qr_seed.py),
never by calling the code under test.
"""

from __future__ import annotations

import fnmatch
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy.engine import make_url

from server.dimse.ae import DimseServer
from storage.archive import Archive, open_archive
from storage.index.models import Patient, Study
from tests.conftest import BACKENDS, make_settings
from tests.server.dimse.qr_seed import (
    FIND_SCU,
    PATIENTS,
    SOP_CLASS_OF,
    STUDIES,
    SeededServer,
    SeedPatient,
    SeedSeries,
    SeedStudy,
    qr_associate,
    seeded_server,
    server_with,
)
from tests.server.dimse.scu import accepted_context_id, echo_works
from tests.tcp_proxy import TcpProxy

MODELS = {
    "PATIENT_ROOT": (PatientRootQueryRetrieveInformationModelFind, "-P"),
    "STUDY_ROOT": (StudyRootQueryRetrieveInformationModelFind, "-S"),
}
# What each level returns, beside the matching keys (PS3.4 C.6.1.1, C.6.2.1).
RETURN_KEYS = {
    "PATIENT": ["PatientName", "PatientID", "PatientBirthDate", "NumberOfPatientRelatedStudies"],
    "STUDY": [
        "PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber",
        "StudyDescription", "ModalitiesInStudy", "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    ],
    "SERIES": [
        "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
    ],
    "IMAGE": [
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
    ],
}  # fmt: skip
UNIQUE_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


# -- the seed as flat records, one per entity, holding the values the responses should carry --


def patient_record(p: SeedPatient) -> dict[str, Any]:
    return {
        "PatientName": p.name,
        "PatientID": p.patient_id,
        "PatientBirthDate": p.birth_date,
        "NumberOfPatientRelatedStudies": sum(s.patient == p for s in STUDIES),
    }


def study_record(s: SeedStudy) -> dict[str, Any]:
    return {
        **patient_record(s.patient),
        "StudyInstanceUID": s.uid,
        "StudyDate": s.date,
        "StudyTime": s.time,
        "AccessionNumber": s.accession,
        "StudyDescription": s.description,
        "ModalitiesInStudy": s.modalities,
        "SOPClassesInStudy": {SOP_CLASS_OF[m] for m in s.modalities},
        "NumberOfStudyRelatedSeries": len(s.series),
        "NumberOfStudyRelatedInstances": s.instance_count,
    }


def series_record(s: SeedStudy, se: SeedSeries) -> dict[str, Any]:
    return {
        **study_record(s),
        "SeriesInstanceUID": se.uid,
        "Modality": se.modality,
        "SeriesNumber": se.number,
        "NumberOfSeriesRelatedInstances": len(se.instances),
    }


def image_records() -> Iterator[dict[str, Any]]:
    for s in STUDIES:
        for se in s.series:
            for number, uid in enumerate(se.instances, start=1):
                record = series_record(s, se)
                yield {
                    **record,
                    "SOPInstanceUID": uid,
                    "SOPClassUID": SOP_CLASS_OF[se.modality],
                    "InstanceNumber": number,
                }


RECORDS: dict[str, list[dict[str, Any]]] = {
    "PATIENT": [patient_record(p) for p in PATIENTS],
    "STUDY": [study_record(s) for s in STUDIES],
    "SERIES": [series_record(s, se) for s in STUDIES for se in s.series],
    "IMAGE": list(image_records()),
}


def wildcard(pattern: str) -> Callable[[str], bool]:
    """PS3.4 C.2.2.2.4, case-insensitive as Person Names are by default."""
    return lambda value: fnmatch.fnmatchcase(value.upper(), pattern.upper())


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    level: str
    keys: dict[str, str]  # the Identifier's matching keys
    expected: Callable[[dict[str, Any]], bool]  # which seed records match


S1, S2, S3, S4, S5 = STUDIES
CASES = [
    Case("single-value-pn", "STUDY_ROOT", "STUDY", {"PatientName": "DOE^JANE"},
         lambda r: r["PatientName"] == "DOE^JANE"),
    Case("single-value-pn-other-case", "STUDY_ROOT", "STUDY", {"PatientName": "doe^john"},
         lambda r: r["PatientID"] == "PAT-2"),
    Case("wildcard-star", "STUDY_ROOT", "STUDY", {"PatientName": "doe*"},
         lambda r: wildcard("DOE*")(r["PatientName"])),
    Case("wildcard-question", "STUDY_ROOT", "STUDY", {"PatientName": "D?E^J*"},
         lambda r: wildcard("D?E^J*")(r["PatientName"])),
    Case("wildcard-lo", "STUDY_ROOT", "STUDY", {"StudyDescription": "CT*"},
         lambda r: r["StudyDescription"].startswith("CT")),
    Case("universal", "STUDY_ROOT", "STUDY", {}, lambda r: True),
    Case("single-value-sh", "STUDY_ROOT", "STUDY", {"AccessionNumber": "ACC-101"},
         lambda r: r["AccessionNumber"] == "ACC-101"),
    Case("range-da", "STUDY_ROOT", "STUDY", {"StudyDate": "20260101-20260131"},
         lambda r: "20260101" <= r["StudyDate"] <= "20260131"),
    Case("range-da-open-end", "STUDY_ROOT", "STUDY", {"StudyDate": "20260201-"},
         lambda r: r["StudyDate"] >= "20260201"),
    Case("range-da-open-start", "STUDY_ROOT", "STUDY", {"StudyDate": "-20251231"},
         lambda r: r["StudyDate"] <= "20251231"),
    Case("range-tm", "STUDY_ROOT", "STUDY", {"StudyTime": "-080000"},
         lambda r: r["StudyTime"] <= "080000"),
    Case("uid-list", "STUDY_ROOT", "STUDY", {"StudyInstanceUID": f"{S1.uid}\\{S3.uid}"},
         lambda r: r["StudyInstanceUID"] in (S1.uid, S3.uid)),
    Case("modalities-in-study", "STUDY_ROOT", "STUDY", {"ModalitiesInStudy": "MR"},
         lambda r: "MR" in r["ModalitiesInStudy"]),
    Case("patient-universal", "PATIENT_ROOT", "PATIENT", {"PatientName": "*"}, lambda r: True),
    Case("patient-id", "PATIENT_ROOT", "PATIENT", {"PatientID": "PAT-1"},
         lambda r: r["PatientID"] == "PAT-1"),
    Case("patient-non-ascii-wildcard", "PATIENT_ROOT", "PATIENT", {"PatientName": "müller*"},
         lambda r: r["PatientID"] == "PAT-4"),
    Case("patient-root-study", "PATIENT_ROOT", "STUDY", {"PatientID": "PAT-1"},
         lambda r: r["PatientID"] == "PAT-1"),
    Case("series", "STUDY_ROOT", "SERIES", {"StudyInstanceUID": S1.uid},
         lambda r: r["StudyInstanceUID"] == S1.uid),
    Case("series-modality", "STUDY_ROOT", "SERIES", {"StudyInstanceUID": S1.uid, "Modality": "MR"},
         lambda r: r["StudyInstanceUID"] == S1.uid and r["Modality"] == "MR"),
    Case("patient-root-series", "PATIENT_ROOT", "SERIES",
         {"PatientID": "PAT-1", "StudyInstanceUID": S2.uid},
         lambda r: r["StudyInstanceUID"] == S2.uid),
    Case("image", "STUDY_ROOT", "IMAGE",
         {"StudyInstanceUID": S1.uid, "SeriesInstanceUID": S1.series[0].uid},
         lambda r: r["SeriesInstanceUID"] == S1.series[0].uid),
    Case("patient-root-image-uid-list", "PATIENT_ROOT", "IMAGE",
         {"PatientID": "PAT-4", "StudyInstanceUID": S5.uid,
          "SeriesInstanceUID": S5.series[0].uid, "SOPInstanceUID": S5.series[0].instances[1]},
         lambda r: r["SOPInstanceUID"] == S5.series[0].instances[1]),
]  # fmt: skip


@pytest.fixture(scope="module", params=BACKENDS)
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SeededServer]:
    with seeded_server(request.param, request, tmp_path_factory.mktemp("find")) as seeded:
        yield seeded


def identifier(case: Case) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = case.level
    for keyword in RETURN_KEYS[case.level]:
        setattr(ds, keyword, "")
    for keyword, value in case.keys.items():
        setattr(ds, keyword, value)
    return ds


def find_with_pynetdicom(server: DimseServer, case: Case) -> list[Dataset]:
    sop_class = MODELS[case.model][0]
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(sop_class)
    assoc = qr_associate(server, ae)
    try:
        responses = list(assoc.send_c_find(identifier(case), sop_class))
    finally:
        assoc.release()
    statuses = [int(status.Status) for status, _ in responses]
    assert statuses[-1] == 0x0000 and set(statuses[:-1]) <= {0xFF00}, statuses
    return [ds for _, ds in responses[:-1]]


def find_with_findscu(server: DimseServer, case: Case, directory: Path) -> list[Dataset]:
    directory.mkdir()
    keys = ["-k", "SpecificCharacterSet=ISO_IR 192", "-k", f"QueryRetrieveLevel={case.level}"]
    for keyword in RETURN_KEYS[case.level]:
        if keyword not in case.keys:
            keys += ["-k", keyword]
    for keyword, value in case.keys.items():
        keys += ["-k", f"{keyword}={value}"]
    result = subprocess.run(
        [FIND_SCU, MODELS[case.model][1], "-aec", server.settings.dimse.ae_title, "-X",
         "-od", str(directory), *keys, "127.0.0.1", str(server.port)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(path) for path in sorted(directory.glob("rsp*.dcm"))]


def assert_matches(case: Case, responses: list[Dataset]) -> None:
    expected = {r[UNIQUE_KEY[case.level]]: r for r in RECORDS[case.level] if case.expected(r)}
    found = [str(ds[UNIQUE_KEY[case.level]].value) for ds in responses]
    assert sorted(found) == sorted(expected), case.id
    for ds in responses:
        record = expected[str(ds[UNIQUE_KEY[case.level]].value)]
        assert ds.QueryRetrieveLevel == case.level
        for keyword in [*RETURN_KEYS[case.level], *case.keys]:
            assert keyword in ds, f"{case.id}: requested key {keyword} not returned"
            want, got = record[keyword], ds[keyword].value
            if isinstance(want, set):
                got = set(got) if isinstance(got, list | pydicom.multival.MultiValue) else {got}
            elif isinstance(want, int):
                got = int(got)
            else:
                got = str(got)
            assert got == want, f"{case.id}: {keyword} {got!r} != {want!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_c_find_with_pynetdicom(seeded: SeededServer, case: Case) -> None:
    assert_matches(case, find_with_pynetdicom(seeded.server, case))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_c_find_with_findscu(seeded: SeededServer, case: Case, tmp_path: Path) -> None:
    assert_matches(case, find_with_findscu(seeded.server, case, tmp_path / "responses"))


def test_person_names_match_case_sensitively_when_configured(seeded: SeededServer) -> None:
    server = server_with(seeded.server, query={"case_insensitive_person_names": False})
    try:
        case = Case("case-sensitive", "STUDY_ROOT", "STUDY", {"PatientName": "DOE*"},
                    lambda r: fnmatch.fnmatchcase(r["PatientName"], "DOE*"))  # fmt: skip
        responses = find_with_pynetdicom(server, case)
        assert_matches(case, responses)
        assert {str(ds.PatientID) for ds in responses} == {"PAT-1"}  # not Doe^John
    finally:
        server.stop()


def test_unknown_keys_are_returned_empty(seeded: SeededServer) -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = S1.uid
    ds.PatientComments = "anything"  # not a key the index holds: not matched, returned empty
    ds.ReferencedStudySequence = []
    ds.add_new(0x00091010, "LO", "")  # a private attribute
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = qr_associate(seeded.server, ae)
    try:
        responses = list(assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert [int(status.Status) for status, _ in responses] == [0xFF00, 0x0000]
    found = responses[0][1]
    assert found.StudyInstanceUID == S1.uid
    assert "PatientComments" in found and not found.PatientComments
    assert "ReferencedStudySequence" in found and len(found.ReferencedStudySequence) == 0
    assert 0x00091010 in found and not found[0x00091010].value


def test_non_ascii_values_come_back_as_utf8(seeded: SeededServer) -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "PATIENT"
    ds.PatientID = "PAT-4"
    ds.PatientName = ""
    ae = AE()
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = qr_associate(seeded.server, ae)
    try:
        responses = list(assoc.send_c_find(ds, PatientRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    found = responses[0][1]
    assert found.SpecificCharacterSet == "ISO_IR 192"
    assert str(found.PatientName) == "MÜLLER^HANS"


MALFORMED = [
    ("missing-level", {"PatientName": "DOE*"}, 0xA900),
    ("unknown-level", {"QueryRetrieveLevel": "FRAME", "PatientName": "DOE*"}, 0xA900),
    ("patient-level-in-study-root", {"QueryRetrieveLevel": "PATIENT", "PatientID": ""}, 0xA900),
    ("bad-is", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": S1.uid,
                "SeriesNumber": "abc"}, 0xA900),
    ("bad-da", {"QueryRetrieveLevel": "STUDY", "StudyDate": "2026-01-01"}, 0xA900),
    ("bad-uid", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"}, 0xA900),
]  # fmt: skip


@pytest.mark.parametrize(
    ("keys", "status"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_identifier_is_refused(
    seeded: SeededServer, keys: dict[str, str], status: int, tmp_path: Path
) -> None:
    args = [arg for keyword, value in keys.items() for arg in ("-k", f"{keyword}={value}")]
    result = subprocess.run(
        [FIND_SCU, "-d", "-S", "-aec", "HILUM", "-X", "-od", str(tmp_path), *args,
         "127.0.0.1", str(seeded.server.port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert f"DIMSE Status                  : 0x{status:04x}" in result.stdout + result.stderr
    assert not list(tmp_path.glob("rsp*.dcm"))
    # The same over pynetdicom, with the Error Comment.
    ds = Dataset()
    for keyword, value in keys.items():
        # Raw, as an SCU on the wire would send it: pydicom refuses to build a bad IS value.
        tag, raw = Tag(tag_for_keyword(keyword)), value.encode() + b" " * (len(value) % 2)
        ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = qr_associate(seeded.server, ae)
    try:
        responses = list(assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert len(responses) == 1
    assert int(responses[0][0].Status) == status and responses[0][0].ErrorComment
    assert echo_works(seeded.server)


MANY = 3000


def _seed_many_studies(archive: Archive, patient_id: str) -> None:
    """MANY studies of one patient, written straight into the index."""
    with archive.index.write() as session:
        patient = Patient(
            partition=archive.partition, patient_id=patient_id, patient_name="MANY^STUDIES",
            patient_name_upper="MANY^STUDIES",
        )  # fmt: skip
        session.add(patient)
        session.flush()
        now = datetime.now(UTC)
        session.add_all(
            Study(
                partition=archive.partition,
                patient_pk=patient.id,
                study_instance_uid=f"1.2.826.0.1.3680043.8.498.78.{i}",
                created_at=now,
                last_instance_at=now,
            )  # fmt: skip
            for i in range(MANY)
        )


def test_c_cancel_stops_a_long_find(dimse_server: DimseServer, archive: Archive) -> None:
    """3000 studies of one patient; C-CANCEL after the first match ends the stream."""
    patient_id = "PAT-MANY"
    _seed_many_studies(archive, patient_id)
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = ""
    ae = AE()
    context = StudyRootQueryRetrieveInformationModelFind
    ae.add_requested_context(context)
    assoc = qr_associate(dimse_server, ae)
    try:
        statuses = []
        responses = assoc.send_c_find(ds, context, msg_id=7)
        for status, _ in responses:
            statuses.append(int(status.Status))
            if len(statuses) == 1:
                context_id = accepted_context_id(assoc, context)
                assoc.send_c_cancel(7, context_id)
    finally:
        assoc.release()
    assert statuses[-1] == 0xFE00, statuses[-3:]
    assert set(statuses[:-1]) == {0xFF00} and len(statuses) - 1 < MANY
    assert echo_works(dimse_server)


def test_find_longer_than_the_network_timeout_keeps_the_association(
    tmp_path: Path, postgres_url: str
) -> None:
    """A C-FIND that takes longer than ``network_timeout_s`` is an association at work, not an
    idle one: its index stalls for 1.5 s (a proxy holds every byte to and from PostgreSQL),
    yet the match arrives, and the association still serves the next request. (One match:
    the SCU digests each response long after a fast SCP has sent it, and a backlog of
    thousands would keep it silent past the SCP's idle timeout once the answer is sent.)"""
    url = make_url(postgres_url)
    proxy = TcpProxy(url.port or 5432)
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    settings = make_settings(tmp_path, database_url=proxied, dimse={"network_timeout_s": 0.5})
    archive = open_archive(settings, migrate=True)
    _seed_many_studies(archive, "PAT-MANY")
    server = DimseServer(settings, archive)
    server.start()
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = "PAT-MANY"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.78.7"
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = qr_associate(server, ae)
    stall = threading.Timer(1.5, proxy.release)
    try:
        proxy.hold()
        stall.start()
        began = time.monotonic()
        statuses = []
        for status, _ in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
            statuses.append(int(status.Status) if "Status" in status else None)
        took = time.monotonic() - began
        time.sleep(0.2)  # the SCP's association thread is back in its loop, timer checked
        ds.PatientID = "NOBODY"
        responses = assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind)
        second = [int(status.Status) for status, _ in responses if "Status" in status]
        established = assoc.is_established
        assoc.release()
    finally:
        stall.cancel()
        proxy.release()
        server.stop()
        archive.close()
        proxy.close()
    assert took > 3 * settings.dimse.network_timeout_s  # the stall held the C-FIND
    assert statuses == [0xFF00, 0x0000]
    assert established and second == [0x0000]
