"""Index against blob store: missing blobs, orphan blobs, checksum mismatches."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import func, select

from storage.archive import Archive
from storage.blobs import is_blob_key
from storage.errors import NotFound
from storage.index.models import Instance


@dataclass
class VerifyReport:
    instances: int = 0
    missing: list[str] = field(default_factory=list)  # SOP Instance UIDs whose blob is gone
    mismatched: list[str] = field(default_factory=list)  # SOP Instance UIDs, content changed
    orphans: list[str] = field(default_factory=list)  # blob keys no index row references

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched or self.orphans)


def verify_archive(
    archive: Archive,
    *,
    checksums: bool = True,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check every indexed instance's blob (existence, and SHA-256 when ``checksums``), then
    list the store for blobs no row references. Reads rows in batches, never all at once."""
    report = VerifyReport()
    referenced: set[str] = set()
    with archive.index.read() as session:
        report.instances = session.execute(select(func.count(Instance.id))).scalar_one()
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.blob_key, Instance.sha256).execution_options(
                yield_per=1000
            )
        )
        for uid, key, sha in rows:
            referenced.add(key)
            try:
                if checksums:
                    if _sha256_of(archive, key) != sha:
                        report.mismatched.append(uid)
                elif not archive.blobs.exists(key):
                    report.missing.append(uid)
            except NotFound:
                report.missing.append(uid)
            if progress:
                progress(1)
    # Temporary files of an interrupted write are orphans too: anything not referenced.
    report.orphans = sorted(key for key in archive.blobs.list_keys() if key not in referenced)
    return report


def _sha256_of(archive: Archive, key: str) -> str:
    if not is_blob_key(key):
        raise NotFound(key)
    digest = hashlib.sha256()
    with archive.blobs.open(key) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
