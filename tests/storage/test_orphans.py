"""Orphan blobs (issue 17): a blob whose index transaction died with the database is left
(ingest cannot tell whether a concurrent sender committed the same key), reported by
``verify_archive``, and removed by ``remove_orphans`` once older than the grace period, never
while young or referenced again; the orphan janitor does it periodically, logged and audited,
one process at a time."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import text

from config import Settings
from storage.archive import Archive, open_archive
from storage.audit import AuditEvent, AuditSearch, search_records
from storage.blobs import BlobStore, PutsMade, instance_blob_key
from storage.errors import StorageUnavailable
from storage.ingest import IngestOutcome, ingest_file
from storage.janitor import SWEEP_LOCK, OrphanJanitor, sweep_orphans
from storage.verify import VerifyReport, remove_orphans, verify_archive
from tests.conftest import S3Server, make_settings, s3_blob_url
from tests.factories import ct_instance, write_part10
from tests.tcp_proxy import TcpProxy
from tests.waiting import wait_until

HOUR = 3600.0


class _CutAfterPut:
    """The real blob store, with the database going away right after the blobs are written:
    the moment between a blob write and its index commit."""

    def __init__(self, store: BlobStore, cut: Callable[[], None]) -> None:
        self.store = store
        self.cut = cut

    def start_put_all(self, blobs: Sequence[tuple[str, Path, bool]]) -> PutsMade:
        refusals = self.store.put_all(blobs)
        self.cut()
        return PutsMade(refusals)

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


# -- the janitor (storage/janitor.py) -----------------------------------------------------------


class Clock:
    """The janitor's POSIX time, moved by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _janitor_records(archive: Archive) -> list[dict]:
    return [
        record
        for record in search_records(archive.index, AuditSearch())
        if record["event"] == AuditEvent.ORPHANS_REMOVED
    ]


def test_the_janitor_removes_a_crash_orphan_after_the_margin_logs_and_audits_it(
    archive_via_proxy: tuple[Archive, TcpProxy],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    archive, proxy = archive_via_proxy
    kept = write_part10(ct_instance(seed=1), tmp_path / "kept.dcm")
    assert ingest_file(archive, kept).outcome is IngestOutcome.STORED
    with pytest.raises(StorageUnavailable):
        ingest_file(
            dataclasses.replace(archive, blobs=_CutAfterPut(archive.blobs, proxy.cut)),
            write_part10(ct_instance(seed=2), tmp_path / "a.dcm"),
        )
    proxy.restore()
    (orphan,) = verify_archive(archive).orphans
    clock = Clock()
    janitor = OrphanJanitor(archive, interval_s=600, grace_s=HOUR, clock=clock)

    first = janitor.sweep()  # within the margin: a store may still be committing it
    assert first is not None and first.removed == [] and first.candidates == 0
    assert archive.blobs.exists(orphan) and _janitor_records(archive) == []

    clock.now += HOUR + 60
    with caplog.at_level(logging.WARNING, logger="storage"):
        second = janitor.sweep()
    assert second is not None and second.removed == [orphan] and second.kept == []
    assert not archive.blobs.exists(orphan)
    assert any("orphan janitor: removed 1 orphan blobs" in r.getMessage() for r in caplog.records)
    (record,) = _janitor_records(archive)
    assert record["action"] == "D" and record["instances"] == 1
    assert record["principal_kind"] == "system" and orphan in record["detail"]
    assert verify_archive(archive).ok  # `hilum verify` is clean, the stored instance untouched

    third = janitor.sweep()  # nothing left to do, nothing recorded
    assert third is not None and third.removed == [] and len(_janitor_records(archive)) == 1


def test_the_janitor_never_removes_a_referenced_blob_however_old(
    archive: Archive, tmp_path: Path
) -> None:
    ingest_file(archive, write_part10(ct_instance(), tmp_path / "a.dcm"))
    (key,) = archive.blobs.list_keys()
    report = sweep_orphans(archive, grace_s=HOUR, now=time.time() + 100 * HOUR)
    assert report.removed == [] and report.candidates == 0
    assert archive.blobs.exists(key) and verify_archive(archive).ok


@pytest.mark.parametrize("backend", ["postgresql-s3"])
def test_only_one_process_sweeps_at_a_time(
    backend: str, archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    """Another process's sweep (its advisory lock, on its own connection to the index):
    this one skips its turn and removes nothing; once that one is done, it sweeps."""
    orphan = instance_blob_key("default", "1.2", "1.2.3", "1.2.3.4", "0" * 64)
    source = write_part10(ct_instance(), tmp_path / "orphan.dcm")
    archive.blobs.put(orphan, source)
    other = open_archive(settings)
    try:
        with other.index.engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": SWEEP_LOCK})
            skipped = sweep_orphans(archive, grace_s=0.001, now=time.time() + 60)
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": SWEEP_LOCK})
    finally:
        other.close()
    assert skipped.held_elsewhere and skipped.removed == []
    assert archive.blobs.exists(orphan)

    swept = sweep_orphans(archive, grace_s=0.001, now=time.time() + 60)
    assert not swept.held_elsewhere and swept.removed == [orphan]


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_the_janitor_sweeps_periodically_once_started(
    backend: str, archive: Archive, tmp_path: Path
) -> None:
    orphan = instance_blob_key("default", "1.2", "1.2.3", "1.2.3.4", "0" * 64)
    archive.blobs.put(orphan, write_part10(ct_instance(), tmp_path / "orphan.dcm"))
    clock = Clock()
    clock.now += 2 * HOUR
    stop, thread = OrphanJanitor(archive, interval_s=0.05, grace_s=HOUR, clock=clock).start()
    try:
        wait_until(lambda: not archive.blobs.exists(orphan), "the janitor's sweep", 30)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert verify_archive(archive).ok and len(_janitor_records(archive)) == 1
