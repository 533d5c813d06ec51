"""Bad input and failing services: the right status or a clean abort, nothing stored changes,
nothing written outside the store, and the server keeps serving."""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from config import Settings
from server.dimse.ae import DimseServer
from storage.archive import Archive, open_archive
from storage.index.models import Instance
from storage.verify import verify_archive
from tests.conftest import S3Server, make_settings, s3_blob_url
from tests.factories import ct_instance, write_part10
from tests.server.dimse.scu import associate, echo_works, send_file_raw
from tests.tcp_proxy import TcpProxy
from tests.waiting import wait_until

OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0xA700, 0xA900, 0xC000


def _uids(archive: Archive) -> set[str]:
    with archive.index.read() as session:
        return set(session.execute(select(Instance.sop_instance_uid)).scalars())


def _files_outside(root: Path, data_dir: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and data_dir not in p.parents}


def _send(server: DimseServer, path: Path) -> int:
    return int(send_file_raw(server, path, CTImageStorage, ExplicitVRLittleEndian).Status)


@pytest.fixture
def stored_first(dimse_server: DimseServer, archive: Archive, tmp_path: Path) -> Iterator[str]:
    """One instance stored before the bad input; it must come through unchanged."""
    ds = ct_instance()
    assert _send(dimse_server, write_part10(ds, tmp_path / "first.dcm")) == 0
    yield ds.SOPInstanceUID
    report = verify_archive(archive)
    assert report.ok and ds.SOPInstanceUID in _uids(archive), report
    assert echo_works(dimse_server)


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"SOPInstanceUID": None}, CANNOT_UNDERSTAND),
        ({"SOPInstanceUID": "../../../../tmp/escaped"}, CANNOT_UNDERSTAND),
        ({"SeriesInstanceUID": "1.2.3/../../x"}, CANNOT_UNDERSTAND),
        ({"SOPClassUID": "1.2.840.10008.1.1"}, DOES_NOT_MATCH),  # Verification, not storage
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"}, DOES_NOT_MATCH),  # MR data set, CT request
    ],
)
def test_invalid_data_sets_get_an_error_status(
    dimse_server: DimseServer,
    archive: Archive,
    stored_first: str,
    tmp_path: Path,
    changes: dict,
    status: int,
) -> None:
    ds = ct_instance()
    # The C-STORE request announces what the file meta says: a valid CT instance.
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    # Written as given: the file meta keeps announcing the valid CT instance.
    ds.preamble = b"\x00" * 128
    ds.file_meta.ImplementationClassUID = generate_uid()
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=False)
    before = _files_outside(tmp_path, dimse_server.settings.server.data_dir)

    assert _send(dimse_server, path) == status
    assert _uids(archive) == {stored_first}
    assert _files_outside(tmp_path, dimse_server.settings.server.data_dir) == before
    assert not Path("/tmp/escaped").exists()


def test_truncated_data_set_gets_cannot_understand(
    dimse_server: DimseServer, archive: Archive, stored_first: str, tmp_path: Path
) -> None:
    path = write_part10(ct_instance(size=64), tmp_path / "full.dcm")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(path.read_bytes()[:-3000])
    assert _send(dimse_server, truncated) == CANNOT_UNDERSTAND
    assert _uids(archive) == {stored_first}


def test_abstract_syntax_that_is_not_storage_is_rejected(
    dimse_server: DimseServer, stored_first: str
) -> None:
    assoc = associate(dimse_server, [(CTImageStorage, None), ("1.2.3.4.5.6", None)])
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
        assert accepted == {CTImageStorage} and rejected == {"1.2.3.4.5.6"}
    finally:
        assoc.release()


def test_garbage_in_a_p_data_pdu_aborts_only_that_association(
    dimse_server: DimseServer, archive: Archive, stored_first: str
) -> None:
    assoc = associate(dimse_server)
    garbage = os.urandom(200)
    # PS3.8 9.3.5: P-DATA-TF, then a PDV item whose length points past the PDU's end.
    pdu = b"\x04\x00" + (len(garbage) + 6).to_bytes(4, "big") + b"\xff\xff\xff\xf0\x01\x03"
    assoc.dul.socket.socket.sendall(pdu + garbage)  # type: ignore[union-attr]
    deadline = time.monotonic() + 15
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
    assert assoc.is_aborted or not assoc.is_established
    assert _uids(archive) == {stored_first}


def test_association_aborted_mid_transfer_stores_nothing(
    dimse_server: DimseServer, archive: Archive, stored_first: str, tmp_path: Path
) -> None:
    ds = ct_instance(size=512)
    path = write_part10(ds, tmp_path / "big.dcm")
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    data = path.read_bytes()
    request.DataSet = io.BytesIO(data[data.index(b"\x08\x00\x16\x00") :])  # after file meta
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    assoc = associate(dimse_server)
    context_id = assoc.accepted_contexts[0].context_id
    fragments = list(message.encode_msg(context_id, 16382))
    assert len(fragments) > 10
    for fragment in fragments[: len(fragments) // 2]:
        assoc.dul.send_pdu(fragment)
    time.sleep(0.5)
    assoc.abort()
    time.sleep(0.5)

    assert _uids(archive) == {stored_first}
    assert _files_outside(tmp_path, dimse_server.settings.server.data_dir) == {
        tmp_path / "first.dcm", path,
    }  # fmt: skip
    # The half-received data set is removed when its association ends, not left to the janitor.
    wait_until(lambda: not list(dimse_server.tmp_dir.iterdir()), "the partial file removed", 10)
    assert dimse_server.remove_stale_temporary_files(max_age_s=0) == 0


# Services that go away during ingest. These build their own settings, so that the database
# or the object store is reached through a proxy whose link the test cuts.


def _server(settings: Settings) -> tuple[Archive, DimseServer]:
    archive = open_archive(settings, migrate=True)
    server = DimseServer(settings, archive)
    server.start()
    return archive, server


def _outage_round_trip(archive: Archive, server: DimseServer, tmp_path: Path, cut, restore):
    kept = write_part10(ct_instance(seed=1), tmp_path / "kept.dcm")
    refused = write_part10(ct_instance(seed=2), tmp_path / "refused.dcm")
    assert _send(server, kept) == 0
    before = _uids(archive)

    cut()
    try:
        assert _send(server, refused) == OUT_OF_RESOURCES
    finally:
        restore()

    assert _uids(archive) == before  # no partial rows
    report = verify_archive(archive)
    assert report.ok, report  # no orphan blob, the stored one intact
    assert _send(server, refused) == 0  # the sender's retry succeeds
    assert len(_uids(archive)) == 2


@pytest.mark.parametrize("service", ["database", "object store"])
def test_service_down_gives_out_of_resources(
    tmp_path: Path, postgres_url: str, s3_server: S3Server, service: str
) -> None:
    proxy = TcpProxy(5432 if service == "database" else s3_server.port)
    via_proxy = {
        "database": {"database_url": postgres_url.replace(":5432/", f":{proxy.port}/")},
        "object store": {"blob_url": s3_blob_url(f"http://127.0.0.1:{proxy.port}")},
    }[service]
    urls = {"database_url": postgres_url, "blob_url": s3_blob_url(s3_server), **via_proxy}
    archive, server = _server(make_settings(tmp_path, **urls))
    try:
        _outage_round_trip(archive, server, tmp_path, proxy.cut, proxy.restore)
    finally:
        server.stop()
        archive.close()
        proxy.close()


def test_blob_directory_gone_gives_out_of_resources(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    archive, server = _server(settings)
    blobs = settings.server.data_dir / "blobs"
    moved = tmp_path / "blobs-away"

    def cut() -> None:  # the disk holding the blobs goes away; a plain file stands in its place
        shutil.move(blobs, moved)
        blobs.write_bytes(b"")

    def restore() -> None:
        blobs.unlink()
        shutil.move(moved, blobs)

    try:
        _outage_round_trip(archive, server, tmp_path, cut, restore)
    finally:
        server.stop()
        archive.close()
