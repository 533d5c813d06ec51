"""The same instance over C-STORE and over STOW-RS: the second is recognised as a re-send by its
data set (the File Meta Information differs: Hilum writes its own for C-STORE, STOW-RS keeps
the sender's), stores nothing new and keeps the first file."""

from __future__ import annotations

from pathlib import Path

import requests

from config import Settings
from server.dimse.ae import DimseServer
from storage.archive import Archive
from storage.query import Query, QueryLevel, locate_instances
from storage.verify import verify_archive
from tests.factories import ct_instance, dataset_bytes, write_part10
from tests.server.dicomweb.conftest import serve
from tests.server.dicomweb.test_stow import STOW_TYPE, multipart
from tests.server.dimse.scu import storescu


def _stored(archive: Archive, study: str) -> list[tuple[str, str]]:
    query = Query(QueryLevel.STUDY, {"StudyInstanceUID": study})
    return [(i.sop_instance_uid, i.blob_key) for i in locate_instances(archive, query)]


def test_c_store_then_stow_of_the_same_instance_is_one_stored_file(
    settings: Settings, archive: Archive, dimse_server: DimseServer, tmp_path: Path
) -> None:
    ds = ct_instance()
    sent = write_part10(ds, tmp_path / "ct.dcm")
    assert storescu(dimse_server, [sent]).returncode == 0
    (first,) = _stored(archive, ds.StudyInstanceUID)
    with archive.blobs.open(first[1]) as stream:
        stored_by_c_store = stream.read()
    assert stored_by_c_store != sent.read_bytes()  # Hilum's File Meta Information

    http = serve(settings, archive)
    try:
        response = requests.post(
            f"http://127.0.0.1:{http.port}/dicomweb/studies",
            data=multipart([sent.read_bytes()]),
            headers={"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"},
            timeout=60,
        )
    finally:
        http.stop()

    assert response.status_code == 200, response.text
    assert _stored(archive, ds.StudyInstanceUID) == [first]
    assert list(archive.blobs.list_keys()) == [first[1]]
    with archive.blobs.open(first[1]) as stream:
        kept = stream.read()
    assert kept == stored_by_c_store
    assert dataset_bytes(sent) in kept
    report = verify_archive(archive)
    assert report.ok and report.instances == 1, report
