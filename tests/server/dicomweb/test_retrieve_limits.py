"""Retrieval of what must not be decoded, or cannot be read (issue 17): every decode checks the
declared size against ``limits.frame_max_bytes`` first and answers 406 with the reason; an
object store that is down is a 503 before the first byte of a multipart body."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from config import Settings
from config.settings import LimitsSettings
from inference.errors import AnalysisError
from inference.pixels import read_series
from server.app import HttpServer
from storage.archive import Archive, open_archive
from storage.ingest import ingest_file
from tests import hostile_files
from tests.conftest import S3Server, make_settings, s3_blob_url
from tests.factories import ct_instance, write_part10
from tests.server.dicomweb.conftest import serve
from tests.tcp_proxy import TcpProxy


def _path(ds: Dataset) -> str:
    return (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def test_decodes_over_the_frame_limit_are_406_and_as_stored_still_served(
    settings: Settings, archive: Archive, tmp_path: Path
) -> None:
    native = ct_instance()  # 32 x 32 x 16 bits: 2 048 bytes a frame
    rle = ct_instance(seed=1)
    rle.compress(RLELossless)
    for n, ds in enumerate((native, rle)):
        ingest_file(archive, write_part10(ds, tmp_path / f"{n}.dcm"))
    # As if stored before the limit was lowered.
    server = serve(
        settings, dataclasses.replace(archive, limits=LimitsSettings(frame_max_bytes=1024))
    )
    base = f"http://127.0.0.1:{server.port}"
    try:
        refused = {
            "rendered": (base + _path(native) + "/rendered", "image/jpeg"),
            "thumbnail": (base + _path(native) + "/thumbnail", "image/png"),
            "frame rendered": (base + _path(rle) + "/frames/1/rendered", "image/png"),
            "decoded frame": (
                base + _path(rle) + "/frames/1",
                'multipart/related; type="application/octet-stream"',
            ),
            "WADO-URI rendered": (
                f"{base}/wado?requestType=WADO&studyUID={native.StudyInstanceUID}"
                f"&seriesUID={native.SeriesInstanceUID}&objectUID={native.SOPInstanceUID}"
                "&contentType=image/jpeg",
                "image/jpeg",
            ),
        }
        for name, (url, accept) in refused.items():
            response = requests.get(url, headers={"Accept": accept}, timeout=30)
            assert response.status_code == 406, (name, response.status_code, response.text)
            assert "limits.frame_max_bytes" in response.json()["error"], name
        as_stored = requests.get(
            base + _path(rle) + "/frames/1",
            headers={"Accept": 'multipart/related; type="image/dicom-rle"'},
            timeout=30,
        )
        assert as_stored.status_code == 200, as_stored.text
    finally:
        server.stop()


def test_a_frame_whose_codestream_disagrees_is_not_decoded(
    settings: Settings, archive: Archive, tmp_path: Path
) -> None:
    # The data set declares 16 x 16 (within every limit), each frame's JPEG header 65535 x
    # 65535: a decoder would allocate 12 GiB. Stored as sent; never decoded.
    path = hostile_files.jpeg_claiming(tmp_path / "j.dcm", 16, 16, 2, header=(65535, 65535))
    ingest_file(archive, path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    server = serve(settings, archive)
    base = f"http://127.0.0.1:{server.port}"
    try:
        for suffix, accept in [
            ("/rendered", "image/png"),
            ("/frames/2/thumbnail", "image/jpeg"),
            ("/frames/1", 'multipart/related; type="application/octet-stream"'),
            (
                "",
                'multipart/related; type="application/dicom"; '
                f"transfer-syntax={ExplicitVRLittleEndian}",
            ),
        ]:
            response = requests.get(
                base + _path(ds) + suffix, headers={"Accept": accept}, timeout=30
            )
            assert response.status_code == 406, (suffix, response.status_code, response.text)
            assert "declares 65535 x 65535" in response.json()["error"], suffix
        as_stored = requests.get(
            base + _path(ds) + "/frames/1",
            headers={"Accept": 'multipart/related; type="image/jpeg"'},
            timeout=30,
        )
        assert as_stored.status_code == 200
    finally:
        server.stop()
    with pytest.raises(AnalysisError, match="declares 65535 x 65535"):
        read_series(archive, ds.StudyInstanceUID, ds.SeriesInstanceUID)


def _outage(
    archive: Archive,
    server: HttpServer,
    tmp_path: Path,
    cut: Callable[[], None],
    restore: Callable[[], None],
) -> None:
    ds = ct_instance()
    ingest_file(archive, write_part10(ds, tmp_path / "a.dcm"))
    base = f"http://127.0.0.1:{server.port}"
    requests_to_make = {
        "instance": (_path(ds), 'multipart/related; type="application/dicom"'),
        "study": (
            f"/dicomweb/studies/{ds.StudyInstanceUID}",
            'multipart/related; type="application/dicom"',
        ),
        "frame": (_path(ds) + "/frames/1", 'multipart/related; type="application/octet-stream"'),
    }
    cut()
    try:
        for name, (path, accept) in requests_to_make.items():
            response = requests.get(base + path, headers={"Accept": accept}, timeout=120)
            assert response.status_code == 503, (name, response.status_code)
            assert response.json()["error"], name
    finally:
        restore()
    for name, (path, accept) in requests_to_make.items():
        response = requests.get(base + path, headers={"Accept": accept}, timeout=60)
        assert response.status_code == 200, (name, response.text)


def test_object_store_down_is_503_before_the_body(
    tmp_path: Path, postgres_url: str, s3_server: S3Server
) -> None:
    proxy = TcpProxy(s3_server.port)
    settings = make_settings(
        tmp_path,
        database_url=postgres_url,
        blob_url=s3_blob_url(f"http://127.0.0.1:{proxy.port}"),
    )
    archive = open_archive(settings, migrate=True)
    server = serve(settings, archive)
    try:
        _outage(archive, server, tmp_path, proxy.cut, proxy.restore)
    finally:
        server.stop()
        archive.close()
        proxy.close()


def test_blob_directory_gone_is_503_before_the_body(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    archive = open_archive(settings, migrate=True)
    server = serve(settings, archive)
    blobs = settings.server.data_dir / "blobs"
    moved = tmp_path / "blobs-away"

    def cut() -> None:  # the disk holding the blobs goes away; a plain file stands in its place
        shutil.move(blobs, moved)
        blobs.write_bytes(b"")

    def restore() -> None:
        blobs.unlink()
        shutil.move(moved, blobs)

    try:
        _outage(archive, server, tmp_path, cut, restore)
    finally:
        server.stop()
        archive.close()
