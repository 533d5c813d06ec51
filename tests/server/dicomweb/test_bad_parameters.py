"""Out-of-range and malformed request parameters are a 400 or a 404 with a reason, never a
500 (issue 17), on both backend pairs: PostgreSQL refuses what SQLite takes (NUL, integers
past its column types) and the other way round."""

from __future__ import annotations

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from tests.server.dicomweb.conftest import ct_series

TOO_BIG = "9223372036854775808"  # 2^63: past every SQL integer


@pytest.fixture
def stored(client: DICOMwebClient) -> Dataset:
    ds = ct_series(1)[0]
    client.store_instances([ds])
    return ds


def _cases(ds: Dataset) -> list[tuple[str, dict[str, str], int]]:
    study = ds.StudyInstanceUID
    return [
        ("/dicomweb/studies", {"offset": TOO_BIG}, 400),
        ("/dicomweb/studies", {"limit": TOO_BIG}, 400),
        ("/dicomweb/studies", {"offset": "9" * 5000}, 400),
        ("/dicomweb/studies", {"limit": "-1"}, 400),
        ("/dicomweb/studies", {"offset": "1e3"}, 400),
        (f"/dicomweb/studies/{study}/instances", {"InstanceNumber": "99999999999"}, 400),
        (f"/dicomweb/studies/{study}/series", {"SeriesNumber": TOO_BIG}, 400),
        ("/dicomweb/studies", {"PatientID": "A\x00B"}, 400),
        ("/dicomweb/studies", {"PatientName": "\x00*"}, 400),
        ("/dicomweb/instances", {"AccessionNumber": "\x00"}, 400),
        ("/api/jobs/99999999999999999999999", {}, 404),
        (f"/api/jobs/{TOO_BIG}", {}, 404),
        ("/api/jobs/9223372036854775807", {}, 404),
        ("/api/studies/%00/jobs", {}, 400),
    ]


def test_out_of_range_parameters_are_refused_with_a_reason(base_url: str, stored: Dataset) -> None:
    root = base_url.removesuffix("/dicomweb")
    for path, params, status in _cases(stored):
        response = requests.get(root + path, params=params, timeout=30)
        assert response.status_code == status, (path, params, response.text)
        assert response.json()["error"], (path, params)
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    # Still serving, and the normal query still finds the instance.
    found = requests.get(
        f"{base_url}/studies", params={"StudyInstanceUID": stored.StudyInstanceUID}, timeout=30
    )
    assert found.status_code == 200 and len(found.json()) == 1
    assert found.headers["X-Content-Type-Options"] == "nosniff"


def test_an_instance_number_past_the_is_range_is_stored_but_not_indexed(
    client: DICOMwebClient, base_url: str
) -> None:
    # PS3.5 6.2: IS lies in -2^31 .. 2^31 - 1; a modality sending more is not refused (the
    # metadata keeps the value), but PostgreSQL's INTEGER column cannot hold it.
    ds = ct_series(1)[0]
    ds.InstanceNumber = "99999999999"
    client.store_instances([ds])
    found = requests.get(
        f"{base_url}/studies/{ds.StudyInstanceUID}/instances",
        params={"includefield": "InstanceNumber"},
        timeout=30,
    )
    assert found.status_code == 200, found.text
    assert [r["00080018"]["Value"][0] for r in found.json()] == [ds.SOPInstanceUID]
    metadata = client.retrieve_instance_metadata(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert metadata["00200013"]["Value"] == [99999999999]


_KEYS = st.sampled_from(
    [
        "limit", "offset", "includefield", "fuzzymatching", "PatientName", "PatientID",
        "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "StudyInstanceUID",
        "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber", "SeriesNumber", "00100010",
        "0020000D", "Modality", "StudyDescription", "x" * 70,
    ]
)  # fmt: skip
_VALUES = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"-?[0-9]{1,25}", fullmatch=True),
    st.sampled_from(["*", "?", "\\", "-", "20200101-", "-20200101", "1.2.3,1.2.4", "NaN", "\x00"]),
)


@settings(
    max_examples=150,
    deadline=5000,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(
    level=st.sampled_from(["studies", "series", "instances"]),
    params=st.lists(st.tuples(_KEYS, _VALUES), max_size=4),
)
def test_any_qido_parameters_are_answered_without_a_server_error(
    base_url: str, level: str, params: list[tuple[str, str]]
) -> None:
    response = requests.get(f"{base_url}/{level}", params=params, timeout=30)
    assert response.status_code in (200, 204, 400), (params, response.text[:300])
