"""The archive: the index database and the blob store, opened together from the settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from config import Settings
from config.settings import LimitsSettings
from storage.audit import AuditEntry, AuditTrail, Requestor, open_json_lines
from storage.blobs import BlobStore, instance_blob_key, open_blob_store
from storage.decoder_pool import DecoderPool
from storage.errors import StorageUnavailable
from storage.index.database import (
    Index,
    create_index_engine,
    require_current_schema,
    upgrade_database,
)
from storage.index.models import DEFAULT_PARTITION
from storage.tiers import open_tiered_blob_store

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy import Connection

    from storage.dicom_file import InstanceHeader
    from storage.errors import StorageError
    from storage.ingest import IngestResult


@dataclass
class Archive:
    index: Index
    blobs: BlobStore
    on_duplicate: Literal["keep", "overwrite"] = "overwrite"
    # Told the outcome of every group of files ingested through this archive (the protocol
    # layer's metrics, labelled with its transport); not told anything about patients.
    on_ingest: Callable[[Sequence[IngestResult | StorageError]], None] | None = None
    partition: str = DEFAULT_PARTITION
    # What one received object may cost (``[limits]``), checked by ingest and every decode.
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    # Where every store, query, retrieve and delete is recorded (``[audit]``); None: nowhere
    # (an archive made by hand, in a test of something else).
    audit: AuditTrail | None = None
    # Where pixel data is decoded, rendered and transcoded, under ``[limits]``' decode budget;
    # shared by the archive's scoped copies.
    decoders: DecoderPool = field(default_factory=lambda: DecoderPool.from_limits(LimitsSettings()))

    def blob_key(self, header: InstanceHeader, content_sha256: str) -> str:
        return instance_blob_key(
            self.partition,
            header.study_instance_uid,
            header.series_instance_uid,
            header.sop_instance_uid,
            content_sha256,
        )

    def record(
        self, requestor: Requestor, *entries: AuditEntry, connection: Connection | None = None
    ) -> None:
        """Write audit records (``storage.audit``) before the action's answer is sent; raises
        :class:`storage.audit.AuditUnavailable`, which refuses the action. ``connection``: the
        index connection the action reads on next, outside a transaction
        (:meth:`storage.audit.AuditTrail.record`)."""
        if self.audit is not None:
            self.audit.record(requestor, *entries, connection=connection)

    def record_refusal(self, requestor: Requestor, entry: AuditEntry) -> None:
        """Record an action already refused: a failure to write it is logged, not raised (the
        requestor gets the action's own refusal)."""
        try:
            self.record(requestor, entry)
        except StorageUnavailable as error:
            log.error("audit record of a refused %s not written: %s", entry.event, error)

    def scoped(self, partition: str) -> Archive:
        """The same archive, seeing ``partition`` only (one request's view of it)."""
        return replace(self, partition=partition)

    def close(self) -> None:
        self.decoders.close()
        if self.audit is not None:
            self.audit.close()
        self.index.dispose()


def open_archive(
    settings: Settings, *, migrate: bool = False, connections: int | None = None
) -> Archive:
    """Connect to the index and the blob store named by ``settings``.

    ``migrate`` runs the database migrations first (``hilum serve`` does; ``hilum dimse`` and
    the other scaled-out processes expect ``hilum db upgrade`` to have run). ``connections``:
    the pool size of the index and the S3 client, what the process can use at once (its
    threads); default ``[dimse] max_associations``, the DIMSE SCP's.
    """
    pool = connections or settings.dimse.max_associations
    engine = create_index_engine(settings.database_url, pool_size=pool)
    if migrate:
        upgrade_database(engine)
    else:
        require_current_schema(engine)
    blobs = open_tiered_blob_store(
        open_blob_store(
            settings.blob_url,
            access_key=settings.storage.s3_access_key,
            secret_key=settings.storage.s3_secret_key,
            max_connections=pool,
        ),
        settings.storage.tiers,
        max_connections=pool,
    )
    index = Index(engine)
    audit_index = index
    if index.dialect != "sqlite":
        # PostgreSQL: the trail's own records (reads, refusals) through an engine of their own,
        # whose commits wait for a disk flush only with [audit] fsync_reads
        # (synchronous_commit per session). SQLite: through the index's own pool, so that a
        # read's record and the read itself run on one connection and the read keeps its page
        # cache (create_index_engine); such a record skips the fsync unless [audit]
        # fsync_reads (storage.audit). Stores and deletes record theirs in their own (fully
        # durable) transaction.
        audit_index = Index(
            create_index_engine(
                settings.database_url,
                pool_size=max(2, pool // 4),
                flush_each_commit=settings.audit.fsync_reads,
                ping_on_checkout=False,  # storage.audit replaces a broken connection once
            )
        )
    audit = AuditTrail(
        audit_index,
        open_json_lines(settings.audit.json_lines, settings.server.data_dir)
        if settings.audit.enabled
        else None,
        enabled=settings.audit.enabled,
        source_id=settings.dimse.ae_title,
        fsync_reads=settings.audit.fsync_reads,
    )
    return Archive(
        index,
        blobs,
        settings.storage.on_duplicate,
        limits=settings.limits,
        audit=audit,
        decoders=DecoderPool.from_limits(settings.limits),
    )
