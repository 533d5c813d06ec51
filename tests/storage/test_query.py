"""DICOM matching translated to SQL (PS3.4 C.2.2.2), on both backend pairs.

The expected answers are computed here from the seed data with plain Python, not by the code
under test.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator

import pytest
from pydicom.uid import MRImageStorage, generate_uid

from storage.archive import Archive
from storage.errors import InvalidQuery
from storage.ingest import ingest_file
from storage.query import (
    InformationModel,
    Query,
    QueryLevel,
    entity_query,
    locate_instances,
    search,
)
from tests.conftest import BACKENDS, shared_archive
from tests.factories import ct_instance, write_part10

# One row per study: patient, study attributes and its series as (modality, instance count).
SEED = [
    ("P1", "DOE^JANE", "20260105", "081500", "ACC-1", [("CT", 3), ("SR", 1)]),
    ("P2", "doe^john", "20260131", "120030", "ACC-2", [("MR", 2)]),
    ("P3", "SMITH^ANNA", "20260201", "235959", "ACC-3", [("CT", 1)]),
    ("P3", "SMITH^ANNA", "20251231", "000000", "ACC-4", [("US", 2), ("CT", 1)]),
    ("P4", "DOERING^MAX", "", "", "BCC-5", [("MR", 1)]),
]


@pytest.fixture(scope="module", params=BACKENDS)
def archive(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Archive]:
    """One archive per backend pair for the whole module, seeded once: every test here only
    queries it."""
    with shared_archive(request.param, request, tmp_path_factory.mktemp("query")) as (_, archive):
        yield archive


@pytest.fixture(scope="module")
def seeded(archive: Archive, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Ingest SEED; return one dict per study with its UIDs and attributes."""
    tmp_path = tmp_path_factory.mktemp("seed")
    studies = []
    for patient_id, name, date, time, accession, series in SEED:
        study_uid = generate_uid()
        study = {
            "PatientID": patient_id,
            "PatientName": name,
            "StudyDate": date,
            "StudyTime": time,
            "AccessionNumber": accession,
            "StudyInstanceUID": study_uid,
            "series": [],
        }
        for series_number, (modality, count) in enumerate(series, start=1):
            series_uid = generate_uid()
            sops = []
            for n in range(count):
                ds = ct_instance(study_uid, series_uid, patient_id=patient_id, seed=n)
                ds.PatientName, ds.StudyDate, ds.StudyTime = name, date, time
                ds.AccessionNumber, ds.Modality, ds.SeriesNumber = (
                    accession,
                    modality,
                    series_number,
                )
                if modality == "MR":
                    ds.SOPClassUID = MRImageStorage
                ingest_file(archive, write_part10(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm"))
                sops.append((ds.SOPInstanceUID, ds.SOPClassUID, n + 1))
            study["series"].append((series_uid, modality, series_number, sops))
        studies.append(study)
    return studies


def _study_uids(archive: Archive, **matching: str) -> set[str]:
    query = Query(QueryLevel.STUDY, matching)
    return {row["StudyInstanceUID"] for row in search(archive, query)}


def _expected(studies: list[dict], predicate) -> set[str]:
    return {s["StudyInstanceUID"] for s in studies if predicate(s)}


def test_single_value_and_universal_matching(archive: Archive, seeded: list[dict]) -> None:
    assert _study_uids(archive, PatientID="P3") == _expected(
        seeded, lambda s: s["PatientID"] == "P3"
    )
    assert _study_uids(archive, AccessionNumber="ACC-2") == _expected(
        seeded, lambda s: s["AccessionNumber"] == "ACC-2"
    )
    assert _study_uids(archive, PatientName="") == _expected(seeded, lambda s: True)
    assert _study_uids(archive, AccessionNumber="*") == _expected(seeded, lambda s: True)
    # Single value matching on strings other than PN is case-sensitive.
    assert _study_uids(archive, AccessionNumber="acc-2") == set()


def test_wildcards_and_case_insensitive_person_names(archive: Archive, seeded: list[dict]) -> None:
    def names(pattern: str) -> set[str]:
        return _expected(seeded, lambda s: fnmatch.fnmatchcase(s["PatientName"].upper(), pattern))

    assert _study_uids(archive, PatientName="DOE*") == names("DOE*")
    assert _study_uids(archive, PatientName="doe^j*") == names("DOE^J*")
    assert _study_uids(archive, PatientName="DOE^JAN?") == names("DOE^JAN?")
    assert _study_uids(archive, AccessionNumber="ACC-?") == _expected(
        seeded, lambda s: fnmatch.fnmatchcase(s["AccessionNumber"], "ACC-?")
    )
    # Literal "%" and "_" are not SQL wild cards.
    assert _study_uids(archive, AccessionNumber="ACC_%") == set()

    sensitive = Query(
        QueryLevel.STUDY, {"PatientName": "doe*"}, case_insensitive_person_names=False
    )
    assert {r["StudyInstanceUID"] for r in search(archive, sensitive)} == _expected(
        seeded, lambda s: s["PatientName"].startswith("doe")
    )


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("20260101-20260131", "20260101", "20260131"),
        ("20260131-", "20260131", "99999999"),
        ("-20260105", "00000000", "20260105"),
        ("20260201", "20260201", "20260201"),
    ],
)
def test_date_range_matching(
    archive: Archive, seeded: list[dict], value: str, low: str, high: str
) -> None:
    # An empty StudyDate lies in no range (the P4 study).
    assert _study_uids(archive, StudyDate=value) == _expected(
        seeded, lambda s: s["StudyDate"] != "" and low <= s["StudyDate"] <= high
    )


def test_time_range_includes_the_whole_last_component(archive: Archive, seeded: list[dict]) -> None:
    # "1200" as an upper bound includes 12:00:30.
    assert _study_uids(archive, StudyTime="0800-1200") == _expected(
        seeded, lambda s: "080000" <= s["StudyTime"] <= "120059"
    )


def test_uid_list_matching(archive: Archive, seeded: list[dict]) -> None:
    wanted = {seeded[0]["StudyInstanceUID"], seeded[2]["StudyInstanceUID"]}
    assert _study_uids(archive, StudyInstanceUID="\\".join(sorted(wanted))) == wanted


def test_modalities_in_study(archive: Archive, seeded: list[dict]) -> None:
    def having(*modalities: str) -> set[str]:
        return _expected(seeded, lambda s: any(m in modalities for _, m, _, _ in s["series"]))

    assert _study_uids(archive, ModalitiesInStudy="CT") == having("CT")
    assert _study_uids(archive, ModalitiesInStudy="MR\\US") == having("MR", "US")
    rows = {r["StudyInstanceUID"]: r for r in search(archive, Query(QueryLevel.STUDY, {
        "ModalitiesInStudy": ""}))}  # fmt: skip
    for study in seeded:
        expected = sorted({m for _, m, _, _ in study["series"]})
        assert rows[study["StudyInstanceUID"]]["ModalitiesInStudy"] == expected


def test_computed_study_attributes(archive: Archive, seeded: list[dict]) -> None:
    keys = ["NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "SOPClassesInStudy"]
    rows = {
        r["StudyInstanceUID"]: r
        for r in search(archive, Query(QueryLevel.STUDY, {}, return_keys=keys))
    }
    for study in seeded:
        row = rows[study["StudyInstanceUID"]]
        sops = [sop for *_, instances in study["series"] for sop in instances]
        assert row["NumberOfStudyRelatedSeries"] == len(study["series"])
        assert row["NumberOfStudyRelatedInstances"] == len(sops)
        assert row["SOPClassesInStudy"] == sorted({sop_class for _, sop_class, _ in sops})


def test_series_and_image_levels(archive: Archive, seeded: list[dict]) -> None:
    study = seeded[0]
    series = search(
        archive,
        Query(
            QueryLevel.SERIES,
            {"StudyInstanceUID": study["StudyInstanceUID"], "Modality": ""},
            return_keys=["NumberOfSeriesRelatedInstances", "SeriesNumber"],
        ),
    )
    got = {
        (r["SeriesInstanceUID"], r["Modality"], r["SeriesNumber"])
        + (r["NumberOfSeriesRelatedInstances"],)
        for r in series
    }
    assert got == {(uid, m, n, len(sops)) for uid, m, n, sops in study["series"]}

    series_uid, _, _, sops = study["series"][0]
    images = list(
        search(
            archive,
            Query(QueryLevel.IMAGE, {"SeriesInstanceUID": series_uid, "InstanceNumber": "2"}),
        )
    )
    assert [(r["SOPInstanceUID"], r["InstanceNumber"]) for r in images] == [
        (uid, n) for uid, _, n in sops if n == 2
    ]
    # Keys of the levels above are returned with the unique keys.
    assert images[0]["StudyInstanceUID"] == study["StudyInstanceUID"]


def test_patient_level_in_patient_root_only(archive: Archive, seeded: list[dict]) -> None:
    query = Query(
        QueryLevel.PATIENT,
        {"PatientName": "SMITH*"},
        return_keys=["NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances"],
        model=InformationModel.PATIENT_ROOT,
    )
    rows = list(search(archive, query))
    smith = [s for s in seeded if s["PatientName"].startswith("SMITH")]
    instances = sum(len(sops) for s in smith for *_, sops in s["series"])
    assert [
        (r["PatientID"], r["NumberOfPatientRelatedStudies"], r["NumberOfPatientRelatedInstances"])
        for r in rows
    ] == [("P3", len(smith), instances)]

    with pytest.raises(InvalidQuery, match="Study Root"):
        list(search(archive, Query(QueryLevel.PATIENT, {})))


@pytest.mark.parametrize(
    "matching",
    [
        {"StudyDate": "2026-01-01"},
        {"StudyDate": "-"},
        {"StudyTime": "25h"},
        {"StudyInstanceUID": "1.2.*"},
        {"StudyInstanceUID": "1.02.3"},
    ],
)
def test_malformed_values_are_rejected(archive: Archive, matching: dict[str, str]) -> None:
    with pytest.raises(InvalidQuery):
        list(search(archive, Query(QueryLevel.STUDY, matching)))


def test_malformed_integer_string(archive: Archive) -> None:
    with pytest.raises(InvalidQuery, match="IS"):
        list(search(archive, Query(QueryLevel.SERIES, {"SeriesNumber": "one"})))


def test_limit_and_offset_page_in_a_stable_order(archive: Archive, seeded: list[dict]) -> None:
    everything = [
        r["StudyInstanceUID"] for r in search(archive, Query(QueryLevel.STUDY, {}, limit=100))
    ]
    pages = [
        r["StudyInstanceUID"]
        for offset in range(0, len(seeded), 2)
        for r in search(archive, Query(QueryLevel.STUDY, {}, limit=2, offset=offset))
    ]
    assert pages == everything
    assert sorted(everything) == sorted(s["StudyInstanceUID"] for s in seeded)


def test_locate_instances_of_several_studies(archive: Archive, seeded: list[dict]) -> None:
    chosen = [seeded[0], seeded[3]]
    query = Query(
        QueryLevel.STUDY, {"StudyInstanceUID": "\\".join(s["StudyInstanceUID"] for s in chosen)}
    )
    located = list(locate_instances(archive, query, with_metadata=True))
    expected = {sop for s in chosen for *_, sops in s["series"] for sop, _, _ in sops}
    assert {i.sop_instance_uid for i in located} == expected
    assert len(located) == len(expected)
    for instance in located:
        assert archive.blobs.exists(instance.blob_key)
        assert instance.metadata["00080018"]["Value"] == [instance.sop_instance_uid]


@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True), (True, True)])
def test_locating_an_entity_by_its_uids_equals_the_general_query(
    archive: Archive, seeded: list[dict], flags: tuple[bool, bool]
) -> None:
    """Study, series and instance URLs (one valid UID per level) take a prebuilt statement;
    what it finds, in what order, equals the general path's answer (a UID list of one UID
    and a universal key take that path)."""
    with_frame_ranges, with_metadata = flags
    study = seeded[3]
    series_uid, _modality, _number, sops = study["series"][0]
    entities = [
        entity_query(study["StudyInstanceUID"]),
        entity_query(study["StudyInstanceUID"], series_uid),
        entity_query(study["StudyInstanceUID"], series_uid, [sops[1][0]]),
    ]
    for query in entities:
        general = Query(query.level, {**query.matching, "PatientID": "*"})

        def located(q: Query) -> list:
            return list(locate_instances(
                archive, q, with_frame_ranges=with_frame_ranges, with_metadata=with_metadata
            ))  # fmt: skip

        assert located(query) == located(general)
        assert located(query)
    assert [i.sop_instance_uid for i in located(entities[0])] == [
        sop for *_, series_sops in study["series"] for sop, _, _ in series_sops
    ]
    other = entity_query(study["StudyInstanceUID"], seeded[0]["series"][0][0])
    assert located(other) == []  # a series of another study
    with pytest.raises(InvalidQuery):
        list(locate_instances(archive, entity_query("1.02.3")))  # PS3.5 9.1: no leading zero
