"""Behind a TLS reverse proxy: the URLs in QIDO-RS answers are the proxy's, when trusted."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from server.app import HttpServer, create_app
from storage.archive import open_archive
from storage.ingest import ingest_file
from tests.conftest import free_port, make_settings
from tests.factories import ct_instance, write_part10

FORWARDED = {
    "X-Forwarded-For": "10.0.0.7",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "pacs.example.org",
    "X-Forwarded-Port": "443",
    "X-Forwarded-Prefix": "/hilum",
}


@pytest.mark.parametrize("trusted, expected_root", [
    (1, "https://pacs.example.org/hilum/dicomweb"),
    (0, "http://127.0.0.1:{port}/dicomweb"),  # not trusted: the headers are anyone's
])  # fmt: skip
def test_retrieve_urls_follow_a_trusted_proxy(
    tmp_path: Path, trusted: int, expected_root: str
) -> None:
    settings = make_settings(tmp_path, http={"trusted_proxies": trusted})
    archive = open_archive(settings, migrate=True)
    ds = ct_instance("1.2.826.0.1.3680043.8.498.70", "1.2.826.0.1.3680043.8.498.71", seed=0)
    ingest_file(archive, write_part10(ds, tmp_path / "ct.dcm"))
    server = HttpServer(create_app(settings, archive), "127.0.0.1", free_port())
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/dicomweb/studies"
        (study,) = requests.get(url, headers=FORWARDED, timeout=10).json()
        retrieve_url = study["00081190"]["Value"][0]
        root = expected_root.format(port=server.port)
        assert retrieve_url == f"{root}/studies/{ds.StudyInstanceUID}"
    finally:
        server.stop()
        archive.close()
