"""Storage tiers: studies that nobody sent to or read for a while move to cheaper blob stores.

``[[storage.tiers]]`` lists colder stores by increasing ``after_days``. The index records which
tier holds each instance's blob (``instance.tier``, "" for the primary store). Blob keys are the
same in every tier: :class:`TieredBlobStore` is the archive's blob store, writes go to the
primary store, and a read goes to the tier the caller's instance row names (the readers pass
``tier=instance.tier``), transparently; a read from a tier records the study as read
(``study.last_read_at``), so the next :func:`apply_tiers` brings it back to the primary store.

A move is copy, verify, update the index, delete the source, in that order and never another:
the SHA-256 of the copy read back from the target must equal the one the index recorded when
the instance was received, before the index points at it; the source is deleted only after the
index commits, and the index keeps the source's tier (``instance.tier_copy``) until it is
deleted, so that a run interrupted before the delete is completed by the next one. Interrupted
anywhere, every instance stays readable where the index says and `hilum verify` stays clean. A
move is never a delete: the last copy of a blob is never removed by this module.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from sqlalchemy import select, update

from config.settings import StorageTier
from storage.blobs import (
    PRIMARY_TIER,
    BlobStore,
    BlobStream,
    PendingPuts,
    open_blob_store,
    unknown_tier,
)
from storage.errors import NotFound, StorageError, StorageUnavailable
from storage.index.database import Index, affected_rows
from storage.index.models import Instance, Series, Study

if TYPE_CHECKING:
    from storage.archive import Archive

log = logging.getLogger(__name__)
PRIMARY = PRIMARY_TIER  # instance.tier of the primary blob store
# pg_try_advisory_lock key of the periodic moves (any constant unique to Hilum: "HILUMTIE").
TIERS_LOCK = 0x48494C554D544945
_READ_MARK_INTERVAL_S = 3600.0  # one study-read write per study and process per hour at most


class TieredBlobStore:
    """The primary blob store and the tiers (a :class:`BlobStore`): a read goes to the tier the
    caller names, the one the index records for the blob (``instance.tier``, read with the rest
    of the instance's row, so following it costs no query). Only when that store does not have
    the blob (a copy deleted by hand, or a row read just before a move repointed it) are the
    other stores probed, and that is logged."""

    def __init__(
        self,
        primary: BlobStore,
        tiers: dict[str, BlobStore],
        on_tier_read: Callable[[str], None] | None = None,
    ) -> None:
        self.primary = primary
        self.tiers = tiers
        self.on_tier_read = on_tier_read

    def store(self, tier: str, key: str = "") -> BlobStore:
        """The store of ``tier``; :class:`StorageUnavailable` naming it when it is not
        configured (``key``: the blob that was asked for, for the message)."""
        if tier == PRIMARY:
            return self.primary
        if tier not in self.tiers:
            raise unknown_tier(key or "(any)", tier)
        return self.tiers[tier]

    def _read(self, key: str, tier: str, read: Callable[[BlobStore], object]) -> object:
        try:
            found = read(self.store(tier, key))
            found_in = tier
        except NotFound as missing:
            for other in (PRIMARY, *self.tiers):
                if other == tier:
                    continue
                try:
                    found = read(self.store(other))
                except NotFound:
                    continue
                found_in = other
                log.warning(
                    "blob %s is not in %s, where the index says it is; read from %s instead "
                    "(a move between tiers at the same time, or a copy removed outside Hilum: "
                    "run `hilum verify`)",
                    key,
                    _tier_name(tier),
                    _tier_name(other),
                )
                break
            else:
                raise missing
        if found_in != PRIMARY and self.on_tier_read is not None:
            self.on_tier_read(key)
        return found

    def put(self, key: str, path: Path, *, may_link: bool = False) -> None:
        self.primary.put(key, path, may_link=may_link)

    def put_all(self, blobs: Sequence[tuple[str, Path, bool]]) -> list[StorageUnavailable | None]:
        return self.primary.put_all(blobs)

    def start_put_all(self, blobs: Sequence[tuple[str, Path, bool]]) -> PendingPuts:
        return self.primary.start_put_all(blobs)

    def open(self, key: str, *, tier: str = PRIMARY) -> BlobStream:
        return self._read(key, tier, lambda store: store.open(key))  # type: ignore[return-value]

    def get_range(self, key: str, offset: int, length: int, *, tier: str = PRIMARY) -> bytes:
        return self._read(key, tier, lambda store: store.get_range(key, offset, length))  # type: ignore[return-value]

    def delete(self, key: str) -> None:
        # Deleting an instance deletes every copy, wherever an interrupted move left one.
        for store in (self.primary, *self.tiers.values()):
            store.delete(key)

    def exists(self, key: str) -> bool:
        return any(store.exists(key) for store in (self.primary, *self.tiers.values()))

    def check(self) -> None:
        self.primary.check()
        for name, store in self.tiers.items():
            try:
                store.check()
            except StorageUnavailable as error:
                raise StorageUnavailable(f"storage tier {name}: {error}") from error

    def list_keys(self) -> Iterator[str]:
        for key, _modified in self.list_modified():
            yield key

    def list_modified(self) -> Iterator[tuple[str, float]]:
        # A key in two tiers (a move interrupted before its source was deleted) once.
        seen: set[str] = set()
        for store in (self.primary, *self.tiers.values()):
            for key, modified in store.list_modified():
                if key not in seen:
                    seen.add(key)
                    yield key, modified


def tier_store(blobs: BlobStore, tier: str, key: str = "") -> BlobStore:
    """The store of ``tier`` alone (no probing of the others: what `hilum verify` checks);
    :class:`StorageUnavailable` naming the tier when it is not configured."""
    if isinstance(blobs, TieredBlobStore):
        return blobs.store(tier, key)
    if tier != PRIMARY:
        raise unknown_tier(key or "(any)", tier)
    return blobs


def open_tiered_blob_store(
    primary: BlobStore, tiers: Sequence[StorageTier], max_connections: int
) -> BlobStore:
    """``primary`` alone when no tier is configured; else a :class:`TieredBlobStore`."""
    if not tiers:
        return primary
    stores = {
        tier.name: open_blob_store(
            tier.blob_url,
            access_key=tier.s3_access_key,
            secret_key=tier.s3_secret_key,
            max_connections=max_connections,
            storage_class=tier.s3_storage_class,
        )
        for tier in tiers
    }
    return TieredBlobStore(primary, stores)


def marking_reads(archive: Archive) -> BlobStore:
    """The archive's blob store, its reads from a tier marking the study read: what the
    processes that serve clients use (DICOMweb, DIMSE). Administrative reads (`hilum verify`,
    `hilum backup`, the moves themselves) use the plain store, so that checking an archive does
    not bring every study back to the primary store."""
    if not isinstance(archive.blobs, TieredBlobStore):
        return archive.blobs
    return TieredBlobStore(
        archive.blobs.primary, archive.blobs.tiers, StudyReadMarker(archive.index)
    )


class StudyReadMarker:
    """Records that a study was read from a tier (``study.last_read_at``): at most once an hour
    per study and process, so that a viewer fetching hundreds of frames costs one write."""

    def __init__(self, index: Index, clock: Callable[[], datetime] | None = None) -> None:
        self.index = index
        self.clock = clock or _utc_now
        self._marked: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> None:
        study_part = key.split("/")[1]  # blob keys group a study's files under its hash
        now = time.monotonic()
        with self._lock:
            if now - self._marked.get(study_part, -_READ_MARK_INTERVAL_S) < _READ_MARK_INTERVAL_S:
                return
            if len(self._marked) > 10_000:
                self._marked.clear()
            self._marked[study_part] = now
        study_pk = (
            select(Series.study_pk)
            .join(Instance, Instance.series_pk == Series.id)
            .where(Instance.blob_key == key)
            .limit(1)
            .scalar_subquery()
        )
        try:
            with self.index.write() as session:
                session.execute(
                    update(Study).where(Study.id == study_pk).values(last_read_at=self.clock())
                )
        except StorageError as error:  # the read itself succeeded; the mark is best effort
            log.warning("a read from a storage tier was not recorded: %s", error)


def _tier_name(tier: str) -> str:
    return f"storage tier {tier!r}" if tier else "the primary blob store"


def _utc_now() -> datetime:
    return datetime.now(UTC)


def target_tier(tiers: Sequence[StorageTier], age: timedelta) -> str:
    """The coldest tier whose ``after_days`` the study's age has reached; "" the primary."""
    target = PRIMARY
    for tier in tiers:
        if age >= timedelta(days=tier.after_days):
            target = tier.name
    return target


@dataclass
class TierReport:
    moved: dict[tuple[str, str], int] = field(default_factory=dict)  # (from, to) → instances
    failed: list[str] = field(default_factory=list)  # what could not be moved, and why
    # Copies left in their old tier by an interrupted run, deleted by this one.
    leftovers_deleted: int = 0

    @property
    def instances(self) -> int:
        return sum(self.moved.values())


@dataclass(frozen=True)
class _Blob:
    id: int
    blob_key: str
    sha256: str
    tier: str


def apply_tiers(
    index: Index,
    blobs: TieredBlobStore,
    tiers: Sequence[StorageTier],
    partition: str | None,
    tmp_dir: Path,
    *,
    now: datetime | None = None,
    progress: Callable[[int], object] | None = None,
) -> TierReport:
    """Move every instance of ``partition`` (None: of every partition) whose study belongs in
    another tier (by the age of its last received instance or its last read from a tier) there:
    copy, verify, update the index, delete the source. A study that fails (a store unreachable,
    a checksum that does not match) is reported and left readable where it was; the others go
    on. First, the old copies that an interrupted run left (``instance.tier_copy``) are
    deleted. Run one at a time (:data:`TIERS_LOCK`: :func:`apply_tiers_periodically` and
    `hilum tiers apply` take it); even so each run repoints a row only if it did not change
    since it was read, and deletes a source only after its own repoint."""
    now = now or _utc_now()
    report = TierReport()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    _delete_leftovers(index, blobs, partition, report)
    query = select(
        Study.id, Study.study_instance_uid, Study.last_instance_at, Study.last_read_at
    ).order_by(Study.id)
    if partition is not None:
        query = query.where(Study.partition == partition)
    with index.read() as session:
        studies = session.execute(query).all()
    for study_pk, study_uid, last_instance_at, last_read_at in studies:
        received = _aware(last_instance_at)
        last_used = max(received, _aware(last_read_at)) if last_read_at else received
        target = target_tier(tiers, now - last_used)
        with index.read() as session:
            rows = session.execute(
                select(Instance.id, Instance.blob_key, Instance.sha256, Instance.tier)
                .join(Series, Instance.series_pk == Series.id)
                .where(Series.study_pk == study_pk, Instance.tier != target)
            ).all()
        moving = [_Blob(*row) for row in rows]
        if not moving:
            continue
        try:
            for blob in moving:
                _copy_verified(blobs.store(blob.tier), blobs.store(target), blob, tmp_dir)
        except StorageError as error:
            report.failed.append(f"study {study_uid}: {error}")
            log.warning("study %s stays where it is: %s", study_uid, error)
            continue
        moved = _repoint(index, moving, target)
        deleted: list[_Blob] = []
        for blob in moving:
            if blob.id in moved:
                if _delete_quietly(blobs.store(blob.tier), blob.blob_key):
                    deleted.append(blob)
                key = (blob.tier or "primary", target or "primary")
                report.moved[key] = report.moved.get(key, 0) + 1
            elif not _still_wanted(index, blob, target):
                # Replaced or deleted meanwhile: the copy is nobody's.
                _delete_quietly(blobs.store(target), blob.blob_key)
            if progress:
                progress(1)
        _forget_copies(index, deleted)
    return report


def apply_tiers_periodically(
    archive: Archive,
    tiers: Sequence[StorageTier],
    tmp_dir: Path,
    interval_s: float,
    stop: threading.Event,
) -> None:
    """:func:`apply_tiers` of every partition, at once and then every ``interval_s`` until
    ``stop`` is set (``hilum worker``'s schedule, ``[storage] tiers_interval_h``); each run's
    outcome logged, a failed run tried again at the next. Several workers on one PostgreSQL
    take turns (:meth:`Index.alone`): a run that finds another one going skips its turn, so a
    study is copied once, not once per worker."""
    if not isinstance(archive.blobs, TieredBlobStore):
        raise TypeError("storage tiers need the archive's TieredBlobStore")
    while not stop.is_set():
        try:
            with archive.index.alone(TIERS_LOCK) as alone:
                if not alone:
                    log.info("storage tiers: another process is moving studies; next turn in "
                             "%.0f s", interval_s)  # fmt: skip
                else:
                    report = apply_tiers(archive.index, archive.blobs, tiers, None, tmp_dir)
                    moved = ", ".join(f"{n} {a}->{b}" for (a, b), n in sorted(report.moved.items()))
                    log.info(
                        "storage tiers applied: %d instances moved (%s), %d studies not moved",
                        report.instances,
                        moved or "none",
                        len(report.failed),
                    )
        except StorageError as error:
            log.warning("storage tiers not applied (next run in %.0f s): %s", interval_s, error)
        stop.wait(interval_s)


def _aware(value: datetime) -> datetime:
    # SQLite keeps no time zone; Hilum writes UTC.
    if value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _copy_verified(source: BlobStore, target: BlobStore, blob: _Blob, tmp_dir: Path) -> None:
    """Copy through a local file whose SHA-256 is the recorded one, then read the target's copy
    back and check it again: the index will point at it, and the source will be deleted."""
    handle, name = tempfile.mkstemp(suffix=".dcm", dir=tmp_dir)
    path = Path(name)
    try:
        with os.fdopen(handle, "wb") as out, source.open(blob.blob_key) as stream:
            digest = _copy_hashing(stream, out)
        if digest != blob.sha256:
            raise StorageUnavailable(
                f"blob {blob.blob_key} does not match the SHA-256 the index recorded; not moved "
                "(run `hilum verify`)"
            )
        target.put(blob.blob_key, path)
    finally:
        path.unlink(missing_ok=True)
    with target.open(blob.blob_key) as copy:
        if _copy_hashing(copy, None) != blob.sha256:
            raise StorageUnavailable(f"the copy of blob {blob.blob_key} reads back different")


def _copy_hashing(stream: BlobStream, out: BinaryIO | None) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
        if out is not None:
            out.write(chunk)
    if out is not None:
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _repoint(index: Index, moving: list[_Blob], target: str) -> set[int]:
    """In one transaction, point each row at ``target`` unless it changed since it was read
    (replaced: another blob key; moved by another run: another tier); the ids repointed."""
    moved: set[int] = set()
    with index.write() as session:
        for blob in moving:
            matched = affected_rows(
                session,
                update(Instance)
                .where(
                    Instance.id == blob.id,
                    Instance.blob_key == blob.blob_key,
                    Instance.tier == blob.tier,
                )
                .values(tier=target, tier_copy=blob.tier),
            )
            if matched == 1:
                moved.add(blob.id)
    return moved


def _still_wanted(index: Index, blob: _Blob, target: str) -> bool:
    with index.read() as session:
        return (
            session.execute(
                select(Instance.id).where(
                    Instance.blob_key == blob.blob_key, Instance.tier == target
                )
            ).first()
            is not None
        )


def _delete_quietly(store: BlobStore, key: str) -> bool:
    try:
        store.delete(key)
    except StorageError as error:
        # The index no longer points here: a leftover copy, which `hilum verify` does not
        # count as an orphan (another tier holds the referenced copy), costs only space, and
        # the next run deletes (instance.tier_copy still names its tier).
        log.warning("blob %s not deleted from its old tier (the next run will): %s", key, error)
        return False
    return True


def _forget_copies(index: Index, deleted: Sequence[_Blob]) -> None:
    """The old copies of ``deleted`` are gone: clear their ``tier_copy`` (one transaction)."""
    if not deleted:
        return
    with index.write() as session:
        for blob in deleted:
            session.execute(
                update(Instance)
                .where(Instance.id == blob.id, Instance.tier_copy == blob.tier)
                .values(tier_copy=None)
            )


def _delete_leftovers(
    index: Index, blobs: TieredBlobStore, partition: str | None, report: TierReport
) -> None:
    """Delete the copies that an interrupted run left in a blob's old tier: each row's
    ``tier_copy`` copy, unless that is the tier the index now names (moved back since)."""
    query = select(Instance.id, Instance.blob_key, Instance.tier, Instance.tier_copy).where(
        Instance.tier_copy.is_not(None)
    )
    if partition is not None:
        query = query.where(Instance.partition == partition)
    with index.read() as session:
        rows = session.execute(query).all()
    deleted: list[_Blob] = []
    for pk, key, tier, copy_tier in rows:
        assert copy_tier is not None  # the query's condition
        if copy_tier != tier:
            try:
                blobs.store(copy_tier, key).delete(key)
            except StorageError as error:
                report.failed.append(f"blob {key}: old copy in {_tier_name(copy_tier)} "
                                     f"not deleted: {error}")  # fmt: skip
                continue
            report.leftovers_deleted += 1
        deleted.append(_Blob(pk, key, "", copy_tier))
    _forget_copies(index, deleted)
