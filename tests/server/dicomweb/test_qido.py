"""QIDO-RS (PS3.18 10.6) with dicomweb-client against the real server: each level, each kind of
matching, includefield, limit/offset, the Warning header and 400s."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from server.app import HttpServer
from tests.conftest import BACKENDS, shared_archive
from tests.server.dicomweb.conftest import ct_series, serve


@pytest.fixture(scope="module", params=BACKENDS)
def http_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpServer]:
    """One archive and server per backend pair for the whole module, seeded once by
    ``studies``: every test here only queries."""
    directory = tmp_path_factory.mktemp("qido")
    with shared_archive(request.param, request, directory) as (settings, archive):
        server = serve(settings, archive)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def studies(http_server: HttpServer) -> dict[str, list[Dataset]]:
    """Two studies: DOE^JANE CT (2 instances, January 2026), SMITH^JOHN MR (1, December 2025)."""
    client = DICOMwebClient(f"http://127.0.0.1:{http_server.port}/dicomweb")
    doe = ct_series(2, patient_id="PAT-1")
    smith = ct_series(1, patient_id="PAT-2", modality="MR")
    for ds in smith:
        ds.PatientName = "SMITH^JOHN"
        ds.StudyDate = "20251201"
        ds.AccessionNumber = "ACC2"
        ds.StudyDescription = "Brain"
    client.store_instances(doe + smith)
    return {"doe": doe, "smith": smith}


def uids(results: list[dict], tag: str = "0020000D") -> set[str]:
    return {r[tag]["Value"][0] for r in results}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"PatientName": "DOE*"}, {"doe"}),  # wild card
        ({"PatientName": "doe^j?ne"}, {"doe"}),  # case-insensitive Person Name, "?"
        ({"PatientID": "PAT-2"}, {"smith"}),  # single value
        ({"StudyDate": "20260101-20260131"}, {"doe"}),  # range
        ({"StudyDate": "-20251231"}, {"smith"}),  # open range
        ({"ModalitiesInStudy": "MR"}, {"smith"}),
        ({"AccessionNumber": "ACC1"}, {"doe"}),
        ({"00100020": "PAT-1"}, {"doe"}),  # by tag
        ({"PatientName": ""}, {"doe", "smith"}),  # universal
        ({"PatientName": "NOBODY*"}, set()),
    ],
)
def test_search_for_studies(
    client: DICOMwebClient, studies: dict[str, list[Dataset]], filters: dict, expected: set
) -> None:
    results = client.search_for_studies(search_filters=filters)
    assert uids(results) == {studies[name][0].StudyInstanceUID for name in expected}


def test_study_results_carry_the_default_attributes(
    client: DICOMwebClient, studies: dict[str, list[Dataset]]
) -> None:
    (result,) = client.search_for_studies(search_filters={"PatientID": "PAT-1"})
    study = Dataset.from_json(result)
    doe = studies["doe"][0]
    assert study.PatientName == "DOE^JANE"
    assert study.StudyDate == "20260115"
    assert study.ModalitiesInStudy == "CT"
    assert study.NumberOfStudyRelatedSeries == 1
    assert study.NumberOfStudyRelatedInstances == 2
    # dicomweb-client sends "Host: 127.0.0.1" without the port, so only the path is sure.
    assert study.RetrieveURL.endswith(f"/dicomweb/studies/{doe.StudyInstanceUID}")
    assert "StudyDescription" not in study


def test_uid_list_matching(client: DICOMwebClient, studies: dict[str, list[Dataset]]) -> None:
    wanted = [studies["doe"][0].StudyInstanceUID, studies["smith"][0].StudyInstanceUID]
    results = client.search_for_studies(search_filters={"StudyInstanceUID": ",".join(wanted)})
    assert uids(results) == set(wanted)


def test_includefield(client: DICOMwebClient, studies: dict[str, list[Dataset]]) -> None:
    (result,) = client.search_for_studies(
        search_filters={"PatientID": "PAT-2"}, fields=["StudyDescription", "00081030"]
    )
    assert Dataset.from_json(result).StudyDescription == "Brain"
    (everything,) = client.search_for_studies(search_filters={"PatientID": "PAT-2"}, fields=["all"])
    assert Dataset.from_json(everything).SOPClassesInStudy == studies["smith"][0].SOPClassUID


def test_limit_and_offset(client: DICOMwebClient, studies: dict[str, list[Dataset]]) -> None:
    first = client.search_for_studies(limit=1)
    second = client.search_for_studies(limit=1, offset=1)
    assert len(first) == len(second) == 1
    assert uids(first) | uids(second) == {s[0].StudyInstanceUID for s in studies.values()}


def test_search_for_series(client: DICOMwebClient, studies: dict[str, list[Dataset]]) -> None:
    doe = studies["doe"][0]
    (series,) = client.search_for_series(study_instance_uid=doe.StudyInstanceUID)
    assert Dataset.from_json(series).NumberOfSeriesRelatedInstances == 2
    assert uids([series], "0020000E") == {doe.SeriesInstanceUID}
    mr = client.search_for_series(search_filters={"Modality": "MR"})
    assert uids(mr, "0020000E") == {studies["smith"][0].SeriesInstanceUID}
    # Without a study in the URL, study attributes come too (PS3.18 10.6.3.3.1).
    assert Dataset.from_json(mr[0]).PatientName == "SMITH^JOHN"


def test_search_for_instances(client: DICOMwebClient, studies: dict[str, list[Dataset]]) -> None:
    doe = studies["doe"]
    in_series = client.search_for_instances(
        study_instance_uid=doe[0].StudyInstanceUID, series_instance_uid=doe[0].SeriesInstanceUID
    )
    assert uids(in_series, "00080018") == {ds.SOPInstanceUID for ds in doe}
    in_study = client.search_for_instances(study_instance_uid=doe[0].StudyInstanceUID)
    assert len(in_study) == 2
    by_number = client.search_for_instances(search_filters={"InstanceNumber": "2"})
    assert uids(by_number, "00080018") == {doe[1].SOPInstanceUID}
    instance = Dataset.from_json(by_number[0])
    assert instance.RetrieveURL.endswith(f"/instances/{doe[1].SOPInstanceUID}")
    assert instance.SOPClassUID == doe[1].SOPClassUID


def test_fuzzymatching_is_accepted(
    client: DICOMwebClient, studies: dict[str, list[Dataset]]
) -> None:
    results = client.search_for_studies(
        search_filters={"PatientName": "smith*"}, fuzzymatching=True
    )
    assert uids(results) == {studies["smith"][0].StudyInstanceUID}


def test_unsupported_key_is_a_warning(base_url: str, studies: dict[str, list[Dataset]]) -> None:
    response = requests.get(
        f"{base_url}/studies", params={"InstitutionName": "X", "PatientID": "PAT-1"}, timeout=30
    )
    assert response.status_code == 200
    assert "InstitutionName is not indexed" in response.headers["Warning"]
    assert response.headers["Warning"].startswith("299 ")
    assert uids(response.json()) == {studies["doe"][0].StudyInstanceUID}
    assert response.json()[0]["00080080"] == {"vr": "LO"}  # returned empty


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "ten"},
        {"offset": "-1"},
        {"StudyDate": "last week"},
        {"NotAnAttribute": "1"},
        {"includefield": "NotAnAttribute"},
        {"StudyInstanceUID": "1.2.abc"},
        {"fuzzymatching": "maybe"},
    ],
)
def test_invalid_query_is_400(base_url: str, params: dict) -> None:
    response = requests.get(f"{base_url}/studies", params=params, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]


def test_empty_result_is_an_empty_array(base_url: str) -> None:
    response = requests.get(
        f"{base_url}/studies/{generate_uid()}/series", headers={"Accept": "application/dicom+json"},
        timeout=30,
    )  # fmt: skip
    assert response.status_code == 200
    assert response.json() == []


def test_a_warning_quoting_a_hostile_parameter_name_is_header_safe(base_url: str) -> None:
    # A sequence-attribute key (".") is echoed in the Warning header; CR, LF, quotes and
    # non-ASCII in it must not break the response.
    name = 'ReferencedSeriesSequence.X"\r\nSet-Cookie: a=b\u00e9' + "Y" * 500
    response = requests.get(f"{base_url}/studies", params={name: "1"}, timeout=30)
    assert response.status_code == 200
    warning = response.headers["Warning"]
    assert warning.startswith('299 hilum "matching on the sequence attribute')
    assert "\r" not in warning and "\n" not in warning and "Set-Cookie" not in response.headers
    assert '\\"' in warning and len(warning) < 300
    assert warning.isascii()


@pytest.mark.parametrize(
    "path",
    [
        "/studies/*/series",
        "/studies/1.2.3%5C1.2.4/instances",
        "/studies/1.2.3/series/1.2.*/instances",
    ],
)
def test_a_path_uid_is_not_a_matching_value(base_url: str, path: str) -> None:
    response = requests.get(base_url + path, timeout=30)
    assert response.status_code == 400
    assert "is not a valid UID" in response.json()["error"]
