"""WADO-URI (PS3.18 9) for legacy viewers, and CORS for viewers on another origin."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image

from config import Settings
from server.app import HttpServer, create_app
from storage.archive import Archive
from tests.conftest import free_port
from tests.factories import data_set_differences
from tests.server.dicomweb.conftest import ct_series


def test_wado_uri(client: DICOMwebClient, base_url: str) -> None:
    (ds,) = ct_series(1)
    client.store_instances([ds])
    url = base_url.removesuffix("/dicomweb") + "/wado"
    params = {
        "requestType": "WADO",
        "studyUID": ds.StudyInstanceUID,
        "seriesUID": ds.SeriesInstanceUID,
        "objectUID": ds.SOPInstanceUID,
    }
    dicom = requests.get(url, params={**params, "contentType": "application/dicom"}, timeout=30)
    assert dicom.headers["Content-Type"] == "application/dicom"
    assert data_set_differences(ds, pydicom.dcmread(BytesIO(dicom.content))) == []

    jpeg = requests.get(url, params={**params, "rows": "16", "windowCenter": "40",
                                     "windowWidth": "400"}, timeout=30)  # fmt: skip
    assert jpeg.headers["Content-Type"] == "image/jpeg"
    assert Image.open(BytesIO(jpeg.content)).size == (16, 16)

    assert requests.get(url, params={**params, "requestType": "X"}, timeout=30).status_code == 400
    missing = {k: v for k, v in params.items() if k != "objectUID"}
    assert requests.get(url, params=missing, timeout=30).status_code == 400
    gif = requests.get(url, params={**params, "contentType": "image/gif"}, timeout=30)
    assert gif.status_code == 406


def test_cors_for_an_allowed_origin_only(settings: Settings, archive: Archive) -> None:
    allowed = settings.model_copy(
        update={
            "http": settings.http.model_copy(
                update={"cors_allowed_origins": ["https://viewer.example.org"]}
            )
        }
    )
    server = HttpServer(create_app(allowed, archive), "127.0.0.1", free_port())
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/dicomweb/studies"
        preflight = requests.options(
            url,
            headers={
                "Origin": "https://viewer.example.org",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "accept",
            },
            timeout=30,
        )
        other = requests.get(url, headers={"Origin": "https://evil.example.org"}, timeout=30)
    finally:
        server.stop()
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://viewer.example.org"
    assert "GET" in preflight.headers["Access-Control-Allow-Methods"]
    assert other.status_code == 200
    assert "Access-Control-Allow-Origin" not in other.headers


@pytest.mark.parametrize("parameter", ["studyUID", "seriesUID", "objectUID"])
def test_uids_are_checked(base_url: str, parameter: str) -> None:
    params = {"requestType": "WADO", "studyUID": "1.2", "seriesUID": "1.3", "objectUID": "1.4"}
    params[parameter] = "*"
    response = requests.get(base_url.removesuffix("/dicomweb") + "/wado", params=params, timeout=30)
    assert response.status_code == 400
    assert "is not a valid UID" in response.json()["error"]
