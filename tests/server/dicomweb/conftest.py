"""The Flask app served by werkzeug's threaded server on a free port, and a dicomweb-client
pointed at it; both backend pairs through the ``archive`` fixture."""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from config import Settings
from server.app import HttpServer, create_app
from server.dicomweb.multipart import read_parts
from storage.archive import Archive
from tests.conftest import free_port
from tests.factories import ct_instance


@pytest.fixture
def http_server(settings: Settings, archive: Archive) -> Iterator[HttpServer]:
    server = serve(settings, archive)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def base_url(http_server: HttpServer) -> str:
    return f"http://127.0.0.1:{http_server.port}/dicomweb"


@pytest.fixture
def client(base_url: str) -> DICOMwebClient:
    return DICOMwebClient(base_url)


def ct_series(count: int, study_uid: str | None = None, **kwargs: object) -> list[Dataset]:
    """``count`` CT instances of one new series (in a new study unless ``study_uid``)."""
    study, series = study_uid or generate_uid(), generate_uid()
    return [ct_instance(study, series, seed=i, **kwargs) for i in range(count)]  # type: ignore[arg-type]


@pytest.fixture
def tmp_files(tmp_path: Path) -> Path:
    folder = tmp_path / "files"
    folder.mkdir()
    return folder


def multipart_parts(response: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """The (headers, content) of each part of a multipart/related response."""
    boundary = response.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
    return [
        (part.headers, part.file.read())
        for part in read_parts(BytesIO(response.content), boundary, BytesIO)  # type: ignore[arg-type]
    ]


def serve(settings: Settings, archive: Archive) -> HttpServer:
    """A started server for ``settings`` (when a test needs other settings than the
    fixture's); the caller stops it."""
    server = HttpServer(create_app(settings, archive), "127.0.0.1", free_port())
    server.start()
    return server
