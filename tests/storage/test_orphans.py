"""Orphan blobs (issue 17): a blob whose index transaction died with the database is left
(ingest cannot tell whether a concurrent sender committed the same key), reported by
``verify_archive``, and removed by ``remove_orphans`` once older than the grace period, never
while young or referenced again."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from config import Settings
from storage.archive import Archive, open_archive
from storage.blobs import BlobStore
from storage.errors import StorageUnavailable
from storage.ingest import IngestOutcome, ingest_file
from storage.verify import VerifyReport, remove_orphans, verify_archive
from tests.conftest import S3Server, make_settings, s3_blob_url
from tests.factories import ct_instance, write_part10
from tests.tcp_proxy import TcpProxy

HOUR = 3600.0


class _CutAfterPut:
    """The real blob store, with the database going away right after the blobs are written:
    the moment between a blob write and its index commit."""

    def __init__(self, store: BlobStore, cut: Callable[[], None]) -> None:
        self.store = store
        self.cut = cut

    def put_all(self, blobs: Sequence[tuple[str, Path, bool]]) -> list[StorageUnavailable | None]:
        refusals = self.store.put_all(blobs)
        self.cut()
        return refusals

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


@pytest.fixture(params=["files", "s3"])
def blob_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "files":
        return ""
    server: S3Server = request.getfixturevalue("s3_server")
    return s3_blob_url(server)


@pytest.fixture
def archive_via_proxy(
    tmp_path: Path, postgres_url: str, blob_url: str
) -> Iterator[tuple[Archive, TcpProxy]]:
    proxy = TcpProxy(5432)
    settings = make_settings(
        tmp_path, database_url=postgres_url.replace(":5432/", f":{proxy.port}/"), blob_url=blob_url
    )
    archive = open_archive(settings, migrate=True)
    try:
        yield archive, proxy
    finally:
        archive.close()
        proxy.close()


def test_database_dying_after_the_blob_write_leaves_an_orphan_that_is_removed_when_old(
    archive_via_proxy: tuple[Archive, TcpProxy], tmp_path: Path
) -> None:
    archive, proxy = archive_via_proxy
    kept = write_part10(ct_instance(seed=1), tmp_path / "kept.dcm")
    assert ingest_file(archive, kept).outcome is IngestOutcome.STORED
    path = write_part10(ct_instance(seed=2), tmp_path / "a.dcm")

    with pytest.raises(StorageUnavailable):
        ingest_file(
            dataclasses.replace(archive, blobs=_CutAfterPut(archive.blobs, proxy.cut)), path
        )
    proxy.restore()

    report = verify_archive(archive)
    assert len(report.orphans) == 1 and not report.missing and not report.mismatched
    (orphan,) = report.orphans

    remove_orphans(archive, report, grace_s=HOUR, now=time.time())  # young: kept
    assert report.orphans == [orphan] and report.removed == []
    assert archive.blobs.exists(orphan)

    remove_orphans(archive, report, grace_s=HOUR, now=time.time() + 2 * HOUR)
    assert report.removed == [orphan] and report.orphans == []
    assert not archive.blobs.exists(orphan)
    assert verify_archive(archive).ok  # the stored instance untouched

    # The sender's retry stores it.
    assert ingest_file(archive, path).outcome is IngestOutcome.STORED
    assert verify_archive(archive).ok


def test_an_orphan_stored_again_since_the_report_is_not_removed(
    archive: Archive, tmp_path: Path
) -> None:
    result = ingest_file(archive, write_part10(ct_instance(), tmp_path / "a.dcm"))
    (key,) = archive.blobs.list_keys()
    # A report taken while the blob was still an orphan (before its rows committed).
    stale = VerifyReport(orphans=[key], orphan_modified={key: 0.0})

    remove_orphans(archive, stale, grace_s=HOUR, now=time.time())

    assert stale.removed == [] and stale.orphans == []
    assert archive.blobs.exists(key)
    assert verify_archive(archive).ok, result


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_leftovers_of_interrupted_writes_are_removed_and_strangers_kept(
    backend: str, archive: Archive, tmp_path: Path, settings: Settings
) -> None:
    ingest_file(archive, write_part10(ct_instance(), tmp_path / "a.dcm"))
    (key,) = archive.blobs.list_keys()
    folder = settings.server.data_dir / "blobs" / Path(key).parent
    leftover = folder / ".tmp-k2x9_a1b"
    stranger = folder / "notes.txt"
    for path in (leftover, stranger):
        path.write_bytes(b"x")
        os.utime(path, (0, 0))

    report = verify_archive(archive)
    assert sorted(report.orphans) == sorted(
        str(p.relative_to(settings.server.data_dir / "blobs")) for p in (leftover, stranger)
    )
    remove_orphans(archive, report, grace_s=HOUR, now=time.time())

    assert not leftover.exists() and stranger.exists()
    assert report.orphans == [str(stranger.relative_to(settings.server.data_dir / "blobs"))]
