"""Pages when Hilum's storage is out of reach: a page that says so (503), never a stack trace.
Server-rendered, so Flask's test client reads them; the browser tests cover the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

from config import Settings
from server.app import create_app
from storage.archive import Archive, open_archive
from storage.blobs import open_blob_store
from storage.index.database import Index, create_index_engine
from storage.index.models import InferenceJob
from storage.ingest import Origin, ingest_file
from tests.conftest import S3Server, free_port, make_settings, s3_blob_url
from tests.factories import write_part10
from tests.inference.test_writers import ct_outputs
from tests.storage.test_worklist import add_job
from tests.tcp_proxy import TcpProxy


@pytest.fixture
def web_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


def unreachable_index(settings: Settings) -> Archive:
    # Nothing listens on this port: every connection is refused.
    engine = create_index_engine(f"postgresql+psycopg://hilum@127.0.0.1:{free_port()}/hilum")
    blobs = open_blob_store(f"file://{settings.server.data_dir / 'blobs'}")
    return Archive(Index(engine), blobs)


@pytest.mark.parametrize("path", ["/", "/worklist/rows", "/studies/1.2.3"])
def test_an_unreachable_index_gives_a_page_that_says_so(web_settings: Settings, path: str) -> None:
    client = create_app(web_settings, unreachable_index(web_settings)).test_client()
    response = client.get(path)
    assert response.status_code == 503
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "<title>Hilum cannot reach its storage · Hilum</title>" in page
    assert "index database unavailable" in page
    assert "Traceback" not in page


def test_a_review_with_an_unreachable_index_changes_nothing_and_says_so(
    web_settings: Settings,
) -> None:
    client = create_app(web_settings, unreachable_index(web_settings)).test_client()
    response = client.post(
        "/studies/1.2.3/reviews",
        data={"job": "1", "tracking_uid": "1.2", "decision": "accepted", "reviewer": "Dr X"},
    )
    assert response.status_code == 503
    assert "Nothing was changed" in response.get_data(as_text=True)


def test_an_unreachable_blob_store_gives_a_page_that_says_so(
    tmp_path: Path, s3_server: S3Server
) -> None:
    proxy = TcpProxy(s3_server.port)
    settings = make_settings(tmp_path, blob_url=s3_blob_url(f"http://127.0.0.1:{proxy.port}"))
    archive = open_archive(settings, migrate=True)
    try:
        _, _, _, report = ct_outputs()
        ingest_file(archive, write_part10(report, tmp_path / "sr.dcm"), Origin("HILUM"))
        study = str(report.StudyInstanceUID)
        add_job(archive, study, "done", findings=1)
        with archive.index.write() as session:
            session.execute(update(InferenceJob).values(outputs=[str(report.SOPInstanceUID)]))
        client = create_app(settings, archive).test_client()
        assert client.get(f"/studies/{study}").status_code == 200  # reads the SR's blob

        proxy.cut()  # the object store goes away
        response = client.get(f"/studies/{study}")
        assert response.status_code == 503
        page = response.get_data(as_text=True)
        assert "Hilum cannot reach its storage" in page and "Traceback" not in page
    finally:
        archive.close()
        proxy.close()
