"""Index against blob store: missing blobs, orphan blobs, checksum mismatches; and the removal
of orphans old enough that no store in progress can still commit them.

An orphan is a blob no index row references: ingest writes the blob before the index rows
and deletes it again when the transaction fails, but when the database itself is gone it
cannot tell whether a concurrent sender committed the same key, so it leaves the blob. A blob
being stored right now is an orphan for an instant too; hence the grace period."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import func, select

from storage.archive import Archive
from storage.blobs import BlobStore, is_blob_key, is_leftover
from storage.delete import delete_blob_unless_referenced
from storage.errors import NotFound, StorageError
from storage.index.models import Instance
from storage.tiers import tier_store

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    instances: int = 0
    missing: list[str] = field(default_factory=list)  # SOP Instance UIDs whose blob is gone
    mismatched: list[str] = field(default_factory=list)  # SOP Instance UIDs, content changed
    orphans: list[str] = field(default_factory=list)  # blob keys no index row references
    # When each orphan was last written (POSIX time), for remove_orphans' grace period.
    orphan_modified: dict[str, float] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)  # orphans remove_orphans deleted

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched or self.orphans)


def verify_archive(
    archive: Archive,
    *,
    checksums: bool = True,
    progress: Callable[[int], object] | None = None,
) -> VerifyReport:
    """Check every indexed instance's blob (existence, and SHA-256 when ``checksums``), then
    list the store for blobs no row references. Reads rows in batches, never all at once."""
    report = VerifyReport()
    referenced: set[str] = set()
    with archive.index.read() as session:
        report.instances = session.execute(select(func.count(Instance.id))).scalar_one()
        rows = session.execute(
            select(
                Instance.sop_instance_uid, Instance.blob_key, Instance.sha256, Instance.tier
            ).execution_options(yield_per=1000)
        )
        for uid, key, sha, tier in rows:
            referenced.add(key)
            try:
                # In the store the index names: a copy in another tier does not count.
                store = tier_store(archive.blobs, tier, key)
                if checksums:
                    if _sha256_of(store, key) != sha:
                        report.mismatched.append(uid)
                elif not store.exists(key):
                    report.missing.append(uid)
            except NotFound:
                report.missing.append(uid)
            if progress:
                progress(1)
    # Temporary files of an interrupted write are orphans too: anything not referenced.
    report.orphan_modified = {
        key: modified for key, modified in archive.blobs.list_modified() if key not in referenced
    }
    report.orphans = sorted(report.orphan_modified)
    return report


def remove_orphans(archive: Archive, report: VerifyReport, *, grace_s: float, now: float) -> None:
    """Delete the report's orphans last written more than ``grace_s`` seconds before ``now``
    (POSIX time), each only if the index still does not reference it (it may have been stored
    again since the report). Removed keys move from ``report.orphans`` to ``report.removed``;
    younger ones, names Hilum never writes and what cannot be removed now stay."""
    kept = []
    for key in report.orphans:
        old_enough = now - report.orphan_modified.get(key, now) > grace_s
        if old_enough and is_blob_key(key) and delete_blob_unless_referenced(archive, key):
            if archive.blobs.exists(key):  # referenced again: kept, and no orphan any more
                continue
            report.removed.append(key)
            log.warning("removed orphan blob %s, unreferenced for over %.0f s", key, grace_s)
            continue
        if old_enough and is_leftover(key):
            try:
                archive.blobs.delete(key)
            except StorageError as error:
                log.warning("could not remove leftover %s: %s", key, error)
            else:
                report.removed.append(key)
                log.warning("removed %s, left by an interrupted blob write", key)
                continue
        kept.append(key)
    report.orphans = kept


def _sha256_of(store: BlobStore, key: str) -> str:
    if not is_blob_key(key):
        raise NotFound(key)
    digest = hashlib.sha256()
    with store.open(key) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
