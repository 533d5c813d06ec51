"""C-STORE SCP with real peers: DCMTK's storescu and pynetdicom."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from server.dimse.ae import DimseServer
from storage.archive import Archive, open_archive
from storage.blobs import PutsMade
from storage.dicom_file import is_storage_sop_class
from storage.index.models import Instance
from storage.verify import verify_archive
from tests.conftest import make_settings
from tests.factories import ct_instance, data_set_differences, dataset_bytes, write_part10
from tests.server.dimse.scu import (
    STORESCU_PROPOSE,
    associate,
    echo_works,
    send_file_raw,
    storescu,
)

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# pydicom's deliberately broken files: their Pixel Data is shorter than the header says.
KNOWN_TRUNCATED = {"MR_truncated.dcm", "SC_rgb_jpeg.dcm", "SC_ybr_full_422_uncompressed.dcm"}


def _stored(archive: Archive) -> dict[str, tuple[str, str]]:
    with archive.index.read() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.blob_key, Instance.transfer_syntax_uid)
        ).all()
    return {uid: (key, syntax) for uid, key, syntax in rows}


def _read_blob(archive: Archive, key: str, tmp_path: Path) -> Path:
    path = tmp_path / f"blob-{key.rsplit('/', 1)[-1]}"
    with archive.blobs.open(key) as stream:
        path.write_bytes(stream.read())
    return path


def _pydicom_storage_files() -> list[tuple[Path, pydicom.Dataset]]:
    """pydicom's test files that are storage instances: Part 10, a storage SOP class."""
    found = []
    for path in sorted(PYDICOM_TEST_FILES.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 (not a Part 10 file: not an instance to send)
            continue
        sop_class = ds.get("SOPClassUID")
        if sop_class and is_storage_sop_class(str(sop_class)):
            found.append((path, ds))
    return found


def test_storescu_sends_every_pydicom_storage_file(
    dimse_server: DimseServer, archive: Archive, tmp_path: Path
) -> None:
    candidates = _pydicom_storage_files()
    syntaxes = {str(ds.file_meta.TransferSyntaxUID) for _, ds in candidates}
    assert len(candidates) > 50 and len(syntaxes) >= 10  # the corpus is what we think it is
    unreadable_to_dcmtk = []
    for path, ds in candidates:
        syntax = str(ds.file_meta.TransferSyntaxUID)
        if syntax in STORESCU_PROPOSE:
            sent = storescu(dimse_server, [path], "-R", STORESCU_PROPOSE[syntax])
            if "F: missing SOP class" not in sent.stderr:
                continue
            unreadable_to_dcmtk.append(path.name)  # DCMTK cannot parse it; pynetdicom can
        send_file_raw(dimse_server, path, str(ds.SOPClassUID), syntax)
    # DCMTK refuses to parse these (odd-length OW in the RLE files; truncation in the others).
    dcmtk_refuses = KNOWN_TRUNCATED | {
        "rtdose_rle.dcm",
        "rtdose_rle_1frame.dcm",
        "rtplan_truncated.dcm",
    }
    assert set(unreadable_to_dcmtk) <= dcmtk_refuses, unreadable_to_dcmtk

    expected, refused = {}, []
    for path, ds in candidates:
        complete = all(ds.get(k) for k in REQUIRED_UIDS)
        # storescu announces the data set's SOP Instance UID; pynetdicom the file meta's, and
        # one that differs from the data set's is refused with 0xA900.
        by_pynetdicom = path.name in unreadable_to_dcmtk or str(
            ds.file_meta.TransferSyntaxUID) not in STORESCU_PROPOSE  # fmt: skip
        announced = ds.file_meta.get("MediaStorageSOPInstanceUID")
        matches = not by_pynetdicom or announced in (None, ds.SOPInstanceUID)
        if complete and path.name not in KNOWN_TRUNCATED and matches:
            expected[str(ds.SOPInstanceUID)] = path
        else:
            refused.append(path)

    stored = _stored(archive)
    # Some pydicom files share a SOP Instance UID (one image in several syntaxes): the last
    # one sent replaced the others under the default policy, so compare against it.
    assert set(stored) == set(expected)
    for uid, (key, syntax) in stored.items():
        sent = expected[uid]  # the last one sent with that UID
        blob = _read_blob(archive, key, tmp_path)
        original = pydicom.dcmread(sent)
        received = pydicom.dcmread(blob)
        assert syntax == original.file_meta.TransferSyntaxUID, sent.name
        assert data_set_differences(original, received) == [], sent.name  # pixel data included
    assert len(refused) >= 5  # the broken files were sent, refused, and left no trace:
    assert verify_archive(archive).ok


def test_stored_data_set_bytes_equal_the_bytes_sent(
    dimse_server: DimseServer, archive: Archive, tmp_path: Path
) -> None:
    """pynetdicom sends the file's data set bytes untouched; Hilum stores them untouched."""
    names = [
        "CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "SC_rgb_rle_2frame.dcm",
        "image_dfl.dcm", "SC_rgb_rle_32bit_2frame.dcm", "examples_ybr_color.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ]  # fmt: skip
    for name in names:
        path = PYDICOM_TEST_FILES / name
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        status = send_file_raw(
            dimse_server, path, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
        )
        assert status.Status == 0x0000, name
        key, _ = _stored(archive)[str(ds.SOPInstanceUID)]
        assert dataset_bytes(_read_blob(archive, key, tmp_path)) == dataset_bytes(path), name


def test_parallel_associations_lose_nothing(
    dimse_server: DimseServer, archive: Archive, tmp_path: Path
) -> None:
    study = generate_uid()
    batches = []
    for a in range(8):
        folder = tmp_path / f"assoc{a}"
        folder.mkdir()
        series = generate_uid()
        batches.append(
            [write_part10(ct_instance(study, series, seed=a * 1000 + i), folder / f"{i}.dcm")
             for i in range(100)]
        )  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda files: storescu(dimse_server, files), batches))

    assert [r.returncode for r in results] == [0] * 8, [r.stderr[-500:] for r in results]
    stored = _stored(archive)
    assert len(stored) == 800
    for files in batches:
        for path in files[::10]:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            blob = _read_blob(archive, stored[uid][0], tmp_path)
            assert data_set_differences(pydicom.dcmread(path), pydicom.dcmread(blob)) == []
    report = verify_archive(archive)  # every checksum recomputed from the blob store
    assert (report.instances, report.ok) == (800, True), report


def test_storescu_reports_success_and_echo(dimse_server: DimseServer, tmp_path: Path) -> None:
    path = write_part10(ct_instance(), tmp_path / "a.dcm")
    result = storescu(dimse_server, [path], "-d")
    assert result.returncode == 0
    assert "DIMSE Status                  : 0x0000: Success" in result.stderr
    echo = subprocess.run(
        ["/usr/bin/echoscu", "-aec", "HILUM", "127.0.0.1", str(dimse_server.port)],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert echo.returncode == 0 and echo_works(dimse_server)


@pytest.mark.parametrize("max_pdu_length", [65536, 1048576], ids=["64KiB", "1MiB"])
def test_max_pdu_length_is_offered_and_large_pdus_are_received(
    tmp_path: Path, max_pdu_length: int
) -> None:
    settings = make_settings(tmp_path, dimse={"max_pdu_length": max_pdu_length})
    archive = open_archive(settings, migrate=True)
    server = DimseServer(settings, archive)
    server.start()
    try:
        ds = ct_instance(size=512)  # 512 KiB of pixel data: several PDUs
        result = storescu(server, [write_part10(ds, tmp_path / "ct.dcm")], "-d")
        # PS3.8 D.1.1: the A-ASSOCIATE-AC carries Hilum's Maximum Length Received (storescu's
        # debug output shows the A-ASSOCIATE-RQ's parameters first, then the AC's).
        offered = re.findall(r"Their Max PDU Receive Size: +(\d+)", result.stderr)
        assert offered[-1] == str(max_pdu_length), result.stderr
        assert result.returncode == 0 and list(_stored(archive)) == [ds.SOPInstanceUID]
        (key, _syntax) = _stored(archive)[ds.SOPInstanceUID]
        stored = pydicom.dcmread(_read_blob(archive, key, tmp_path))
        assert data_set_differences(stored, ds) == []
    finally:
        server.stop()
        archive.close()


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_association_policy_rejects_unknown_calling_ae(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from storage.archive import open_archive
    from tests.conftest import make_settings

    settings = make_settings(
        tmp_path,
        dimse={"allowed_calling_ae_titles": ["CT01"], "require_called_ae_title": True},
    )
    archive = open_archive(settings, migrate=True)
    server = DimseServer(settings, archive)
    server.start()
    try:
        path = write_part10(ct_instance(), tmp_path / "a.dcm")
        base = ["/usr/bin/storescu", "127.0.0.1", str(server.port), str(path)]
        wrong_calling = subprocess.run([*base[:1], "-aet", "INTRUDER", "-aec", "HILUM", *base[1:]],
                                       capture_output=True, text=True, timeout=30)  # fmt: skip
        wrong_called = subprocess.run([*base[:1], "-aet", "CT01", "-aec", "OTHER", *base[1:]],
                                      capture_output=True, text=True, timeout=30)  # fmt: skip
        allowed = subprocess.run([*base[:1], "-aet", "CT01", "-aec", "HILUM", *base[1:]],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
        assert "Association Rejected" in wrong_calling.stderr
        assert "Association Rejected" in wrong_called.stderr
        assert allowed.returncode == 0
        assert len(_stored(archive)) == 1
    finally:
        server.stop()
        archive.close()


class _SlowBlobStore:
    """The real blob store, slower to write than the SCP's network timeout (a slow disk or S3)."""

    def __init__(self, inner: object, delay_s: float) -> None:
        self._inner, self._delay_s = inner, delay_s

    def start_put_all(self, blobs: list) -> PutsMade:
        time.sleep(self._delay_s)
        return PutsMade(self._inner.put_all(blobs))  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def test_ingest_slower_than_the_network_timeout_keeps_the_association(tmp_path: Path) -> None:
    """Storing takes longer than ``network_timeout_s``: the association was busy, not idle,
    so the SCU sends its next instance on it."""
    settings = make_settings(tmp_path, dimse={"network_timeout_s": 0.5})
    archive = open_archive(settings, migrate=True)
    slow = dataclasses.replace(archive, blobs=_SlowBlobStore(archive.blobs, 1.0))
    server = DimseServer(settings, slow)
    server.start()
    study, series = generate_uid(), generate_uid()
    sent = [ct_instance(study, series, seed=n) for n in range(2)]
    try:
        assoc = associate(server)
        statuses = [int(assoc.send_c_store(ds).Status) for ds in sent if assoc.is_established]
        if assoc.is_established:
            assoc.release()
    finally:
        server.stop()
    with archive.index.read() as session:
        stored = set(session.execute(select(Instance.sop_instance_uid)).scalars())
    archive.close()
    assert statuses == [0x0000, 0x0000]
    assert stored == {ds.SOPInstanceUID for ds in sent}
