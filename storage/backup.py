"""Backup and restore of an archive whose index is SQLite (the embedded default).

A backup folder holds ``index.sqlite`` (a snapshot taken with SQLite's online backup API, so a
running ``hilum serve`` keeps writing meanwhile) and ``blobs/<key>`` for every instance that
snapshot references, each checked against the SHA-256 the index recorded. The index is copied
first and the blobs after: blobs are written before the row that references them and never
changed afterwards (new content gets a new key), so every row of the snapshot finds its blob.

PostgreSQL indexes are backed up with pg_dump and the S3 bucket with ``mc mirror``
(docs/operations.md); Hilum does not wrap those tools.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import make_url

from config import Settings
from storage.archive import Archive
from storage.blobs import is_blob_key, open_blob_store
from storage.errors import StorageError
from storage.index.database import Index, create_index_engine
from storage.index.models import Instance

INDEX_FILE = "index.sqlite"
BLOBS_DIR = "blobs"


class BackupError(StorageError):
    """The backup or restore cannot be made; the message says why and what to do."""


@dataclass
class BackupReport:
    instances: int = 0
    bytes: int = 0


def sqlite_path(database_url: str) -> Path:
    """The file of a ``sqlite:///`` index; BackupError for any other database."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        raise BackupError(
            f"hilum backup and restore handle the embedded SQLite index only, not "
            f"{url.render_as_string(hide_password=True)}: use pg_dump / pg_restore and "
            "mc mirror (docs/operations.md)"
        )
    return Path(url.database)


def _empty_or_absent(folder: Path, what: str) -> None:
    if folder.exists() and any(folder.iterdir()):
        raise BackupError(f"{what} {folder} is not empty: give an empty or new folder")


def backup_archive(
    archive: Archive,
    database_url: str,
    target: Path,
    progress: Callable[[int], object] | None = None,
) -> BackupReport:
    """Snapshot the SQLite index into ``target``, then copy every blob it references (through
    the blob store's own interface) into ``target/blobs``, verifying each SHA-256."""
    source = sqlite_path(database_url)
    _empty_or_absent(target, "backup folder")
    target.mkdir(parents=True, exist_ok=True)
    snapshot = target / INDEX_FILE
    with closing(sqlite3.connect(source)) as live, closing(sqlite3.connect(snapshot)) as copy:
        live.backup(copy)  # SQLite's online backup API: a consistent snapshot of a live index
    report = BackupReport()
    index = Index(create_index_engine(f"sqlite:///{snapshot}", pool_size=1))
    try:
        with index.read() as session:
            rows = session.execute(
                select(Instance.blob_key, Instance.sha256, Instance.tier).execution_options(
                    yield_per=1000
                )
            )
            for key, sha256, tier in rows:
                report.bytes += _copy_blob(archive, key, sha256, tier, target / BLOBS_DIR / key)
                report.instances += 1
                if progress:
                    progress(1)
    finally:
        index.dispose()
    return report


def _copy_blob(archive: Archive, key: str, sha256: str, tier: str, path: Path) -> int:
    if not is_blob_key(key):
        raise BackupError(f"the index references an invalid blob key {key!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with archive.blobs.open(key, tier=tier) as stream, open(path, "wb") as out:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != sha256:
        raise BackupError(
            f"blob {key} does not match the SHA-256 the index recorded: the archive is "
            "damaged; run `hilum verify` and restore that instance from an older backup"
        )
    return size


def restore_archive(
    source: Path, settings: Settings, progress: Callable[[int], object] | None = None
) -> BackupReport:
    """Put the backup in ``source`` in place of the absent (or empty) SQLite index of
    ``settings``, then every blob into its empty blob store. Never overwrites an archive. The
    caller migrates the restored index (a backup of an older version) and verifies it."""
    snapshot = source / INDEX_FILE
    if not snapshot.is_file():
        raise BackupError(f"{source} is not a Hilum backup: {INDEX_FILE} is missing")
    index_path = sqlite_path(settings.database_url)
    if index_path.exists() and index_path.stat().st_size > 0:
        raise BackupError(
            f"the index {index_path} exists: restore into an empty data_dir (move the "
            "current archive away first)"
        )
    store = open_blob_store(
        settings.blob_url,
        access_key=settings.storage.s3_access_key,
        secret_key=settings.storage.s3_secret_key,
    )
    if next(iter(store.list_keys()), None) is not None:
        raise BackupError(
            f"the blob store {settings.blob_url} is not empty: restore into an empty one"
        )
    index_path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(snapshot)) as backup, closing(sqlite3.connect(index_path)) as new:
        backup.backup(new)
        # Every blob goes to the primary blob store, whichever tier held it when backed up.
        columns = {row[1] for row in new.execute("PRAGMA table_info(instance)")}
        if "tier" in columns:
            new.execute("UPDATE instance SET tier = ''")
        if "tier_copy" in columns:
            new.execute("UPDATE instance SET tier_copy = NULL")
        new.commit()
    report = BackupReport()
    blobs = source / BLOBS_DIR
    for directory, _folders, files in os.walk(blobs):
        for name in files:
            path = Path(directory) / name
            key = path.relative_to(blobs).as_posix()
            if not is_blob_key(key):
                raise BackupError(f"{path} is not a blob of a Hilum backup")
            store.put(key, path)
            report.instances += 1
            report.bytes += path.stat().st_size
            if progress:
                progress(1)
    return report
