"""DELETE of a study, a series or an instance: index rows and blobs go, the rest stays; off
unless ``[http] allow_delete``; a blob stored again meanwhile is kept."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from config import Settings
from server.app import HttpServer, create_app
from storage.archive import Archive
from storage.blobs import instance_blob_key
from storage.delete import delete_blob_unless_referenced, delete_instance
from storage.ingest import ingest_file
from storage.query import Query, QueryLevel, locate_instances
from tests.conftest import free_port
from tests.racing import IndexThenHook
from tests.server.dicomweb.conftest import ct_series


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """DELETE is off by default; these tests turn it on."""
    return settings.model_copy(
        update={"http": settings.http.model_copy(update={"allow_delete": True})}
    )


def blob_keys(archive: Archive, study: str) -> list[str]:
    query = Query(QueryLevel.STUDY, {"StudyInstanceUID": study})
    return [i.blob_key for i in locate_instances(archive, query)]


def test_delete_instance_series_and_study(client: DICOMwebClient, archive: Archive) -> None:
    ct = ct_series(2)
    study = ct[0].StudyInstanceUID
    mr = ct_series(1, study, modality="MR")
    client.store_instances(ct + mr)
    keys = blob_keys(archive, study)
    assert len(keys) == 3

    client.delete_instance(study, ct[0].SeriesInstanceUID, ct[0].SOPInstanceUID)
    assert len(blob_keys(archive, study)) == 2
    assert sum(archive.blobs.exists(k) for k in keys) == 2

    client.delete_series(study, mr[0].SeriesInstanceUID)
    (remaining,) = client.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert remaining["00080061"]["Value"] == ["CT"]  # ModalitiesInStudy follows the series
    assert len(client.search_for_series(study)) == 1

    client.delete_study(study)
    assert client.search_for_studies(search_filters={"StudyInstanceUID": study}) == []
    assert not any(archive.blobs.exists(k) for k in keys)


def test_delete_unknown_is_404(base_url: str) -> None:
    response = requests.delete(f"{base_url}/studies/{generate_uid()}", timeout=30)
    assert response.status_code == 404
    assert requests.delete(f"{base_url}/studies/x.y", timeout=30).status_code == 400


def test_delete_is_refused_unless_allowed(settings: Settings, archive: Archive) -> None:
    ct = ct_series(1)
    study = ct[0].StudyInstanceUID
    default = settings.model_copy(
        update={"http": settings.http.model_copy(update={"allow_delete": False})}
    )
    server = HttpServer(create_app(default, archive), "127.0.0.1", free_port())
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/dicomweb/studies"
        DICOMwebClient(url.removesuffix("/studies")).store_instances(ct)
        response = requests.delete(f"{url}/{study}", timeout=30)
    finally:
        server.stop()
    assert response.status_code == 403
    assert "allow_delete" in response.json()["error"]
    assert len(blob_keys(archive, study)) == 1


def test_a_blob_stored_again_after_the_commit_is_kept(archive: Archive, tmp_files: Path) -> None:
    """The same instance arrives between DELETE's commit and its blob clean-up (same key,
    the keys being deterministic): the clean-up keeps the blob the new row refers to."""
    (ds,) = ct_series(1)
    path = tmp_files / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    ingest_file(archive, path)
    (key,) = blob_keys(archive, ds.StudyInstanceUID)
    stored_again: list[str] = []

    def store_again_after_the_commit() -> None:
        if not stored_again:  # DELETE's transaction has ended; its blob clean-up is next
            stored_again.append(ingest_file(archive, path).outcome.value)

    deleting = dataclasses.replace(
        archive,
        index=IndexThenHook(archive.index, store_again_after_the_commit),  # type: ignore[arg-type]
    )
    deletion = delete_instance(
        deleting, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )

    assert stored_again == ["stored"]  # a new row, not a duplicate of the deleted one
    assert deletion.instances == 1 and deletion.orphan_blobs == []
    assert blob_keys(archive, ds.StudyInstanceUID) == [key]
    assert archive.blobs.exists(key)


def test_an_unreferenced_blob_is_deleted(archive: Archive, tmp_files: Path) -> None:
    (ds,) = ct_series(1)
    path = tmp_files / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    key = instance_blob_key(
        archive.partition, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, "0" * 64
    )
    archive.blobs.put(key, path)  # no index row refers to it

    assert delete_blob_unless_referenced(archive, key)
    assert not archive.blobs.exists(key)
