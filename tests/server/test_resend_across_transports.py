"""The same instance over C-STORE and over STOW-RS: the second is recognised as a re-send by its
data set (the File Meta Information differs: Hilum writes its own for C-STORE, STOW-RS keeps
the sender's), stores nothing new and keeps the first file."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import requests
from pydicom.uid import generate_uid

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


def test_mixed_senders_re_sending_the_same_instances_lose_nothing(
    settings: Settings, archive: Archive, dimse_server: DimseServer, tmp_path: Path
) -> None:
    """Three C-STORE and three STOW-RS senders at once, each re-sending the same 20 instances
    plus 5 of its own (issue 15's mixed load): every C-STORE is answered (storescu would wait
    for a missing response until the test's timeout) and succeeds, every STOW-RS is 200, each
    instance is stored once, in one file that holds its data set, and verify is clean."""
    study, series = generate_uid(), generate_uid()
    shared = [write_part10(ct_instance(study, series, seed=n), tmp_path / f"shared{n}.dcm")
              for n in range(20)]  # fmt: skip
    own = [[write_part10(ct_instance(seed=100 + 10 * s + n), tmp_path / f"own{s}-{n}.dcm")
            for n in range(5)] for s in range(6)]  # fmt: skip
    http = serve(settings, archive)

    def c_store(sender: int) -> str:
        files = shared[::-1] if sender % 2 else shared
        sent = storescu(dimse_server, [*files, *own[sender]])
        assert sent.returncode == 0 and "E:" not in sent.stderr, sent.stderr
        return "answered"

    def stow(sender: int) -> str:
        files = [*(shared[::-1] if sender % 2 else shared), *own[sender]]
        for at in range(0, len(files), 5):
            response = requests.post(
                f"http://127.0.0.1:{http.port}/dicomweb/studies",
                data=multipart([path.read_bytes() for path in files[at : at + 5]]),
                headers={"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"},
                timeout=120,
            )
            assert response.status_code == 200, response.text
        return "stored"

    try:
        with ThreadPoolExecutor(6) as pool:
            outcomes = [pool.submit(c_store, s) for s in range(3)]
            outcomes += [pool.submit(stow, s) for s in range(3, 6)]
            assert [f.result(timeout=300) for f in outcomes] == ["answered"] * 3 + ["stored"] * 3
    finally:
        http.stop()

    stored = _stored(archive, study)
    assert len(stored) == len({uid for uid, _ in stored}) == 20
    for path in shared:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        (key,) = [key for stored_uid, key in stored if stored_uid == uid]
        with archive.blobs.open(key) as stream:
            assert dataset_bytes(path) in stream.read()
    keys = list(archive.blobs.list_keys())
    assert len(keys) == len(set(keys)) == 20 + 6 * 5
    report = verify_archive(archive)
    assert report.ok and report.instances == 20 + 6 * 5, report
