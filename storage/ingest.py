"""The one path by which anything is stored: DIMSE C-STORE, ``hilum import`` and the AI worker's
results call :func:`ingest_file`, STOW-RS :func:`ingest_files` (a group of files in one index
transaction; :func:`ingest_file` is a group of one).

Order of work, so that a failure at any step loses nothing: parse and validate the header; write
the blob under a key that includes the content hash (so it never overwrites a stored file), and
meanwhile every index row in one transaction, which commits only once the blob is stored (a
refused blob rolls it back); only after that commits, delete a replaced blob. A blob whose index
transaction failed is deleted again; if even that fails, it is an orphan that ``hilum verify``
reports.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from pydicom.dataset import Dataset
from sqlalchemy import Connection, bindparam, exc, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from storage.archive import Archive
from storage.audit import (
    Actor,
    AuditEntry,
    AuditEvent,
    AuditUnavailable,
    Outcome,
    Requestor,
    Transfer,
    audit_errors,
    failure,
)
from storage.blobs import PendingPuts
from storage.data_set_structure import skip_file_meta
from storage.delete import delete_blob_unless_referenced
from storage.dicom_file import (
    InstanceHeader,
    integer_value,
    is_storage_sop_class,
    metadata_json,
    read_instance_header,
    text_value,
)
from storage.errors import InvalidInstance, SOPClassMismatch, StorageError, StorageUnavailable
from storage.events import EventType, NewEvent, record_events
from storage.index.driver import DriverStatement
from storage.index.models import UI, Instance, Patient, Series, Study
from storage.limits import refuse_too_complex

log = logging.getLogger(__name__)
_MAX_ATTEMPTS = 10


class IngestOutcome(enum.Enum):
    STORED = "stored"  # a new instance
    DUPLICATE = "duplicate"  # identical to the stored one: nothing written
    REPLACED = "replaced"  # same SOP Instance UID, new content, on_duplicate = "overwrite"
    KEPT_EXISTING = "kept-existing"  # same SOP Instance UID, new content, on_duplicate = "keep"


@dataclass(frozen=True)
class IngestResult:
    outcome: IngestOutcome
    sop_instance_uid: str
    study_instance_uid: str
    sha256: str
    size: int = 0  # bytes of the Part 10 file as received


@dataclass(frozen=True)
class Origin:
    """Where an object came from, recorded with it."""

    calling_ae_title: str = ""
    # What the sender announced (C-STORE command); checked against the data set.
    announced_sop_class_uid: str | None = None
    announced_sop_instance_uid: str | None = None


@dataclass(frozen=True)
class Received:
    """One Part 10 file to store, as :func:`ingest_files` takes it (the caller keeps and
    removes the file).

    ``header``: the caller's own :func:`read_instance_header` of the same file, when it had to
    read it first (STOW-RS checks the Study Instance UID of each part): not parsed twice.
    ``temporary``: the file is Hilum's own temporary file under the data directory, never
    written again (a received C-STORE data set or STOW-RS part): the filesystem blob store may
    hard-link it instead of copying it.
    """

    path: Path
    origin: Origin = Origin()
    header: InstanceHeader | None = None
    temporary: bool = False
    # (SHA-256 hex digest, size) of the file, when the caller hashed it as it wrote it (a
    # C-STORE data set hashed as it arrived): the file is not read again to hash it.
    sha256: tuple[str, int] | None = None
    # Who stores it (``server.context.RequestContext``), for the audit trail; None: Hilum
    # itself (``storage.audit.Actor``).
    requestor: Requestor | None = None
    # The DIMSE association's transfer it belongs to: audited per study when the transfer
    # begins and when it completes (``storage.audit.Transfer``), not per instance.
    transfer: Transfer | None = None


def ingest_file(
    archive: Archive,
    path: Path,
    origin: Origin = Origin(),
    *,
    header: InstanceHeader | None = None,
    temporary: bool = False,
    sha256: tuple[str, int] | None = None,
    requestor: Requestor | None = None,
) -> IngestResult:
    """Store the DICOM Part 10 file at ``path``: :func:`ingest_files` of one file, its
    :class:`StorageError` raised."""
    (outcome,) = ingest_files(
        archive, [Received(path, origin, header, temporary, sha256, requestor=requestor)]
    )
    if isinstance(outcome, StorageError):
        raise outcome
    return outcome


def ingest_files(
    archive: Archive, received: Sequence[Received]
) -> list[IngestResult | StorageError]:
    """Store several files with one index transaction: what each became, in order, or the
    :class:`StorageError` that refused it (one refused file does not hold the others back).

    The steps are those of one file (module docstring), each over the whole group: one look-up
    of the stored instances, the blobs, then the index rows of every file in one transaction,
    so a group costs one commit (one fsync of the SQLite log) instead of one each. A file that
    lost a race with another sender tries again alone. A result is final only when this
    returns: nothing is answered before the commit.

    Audit (``storage/audit.py``): the instances a transaction writes are recorded in it, one
    record per requestor and study (PS3.15 A.5.3.7 DICOM Instances Transferred: one message per
    set of instances of a single patient), so none is stored unaudited; duplicates and refusals
    are recorded after, in one transaction, and a duplicate whose record cannot be written is
    refused too. A file of a DIMSE transfer (``Received.transfer``) is recorded only when it
    is its transfer's first of its study (Begin Transferring DICOM Instances, in the same
    transaction), and counted for the record at the transfer's end.
    """
    outcomes: list[IngestResult | StorageError | None] = [None] * len(received)
    pending: list[_Prepared] = []
    headers: list[InstanceHeader | None] = [None] * len(received)
    for n, file in enumerate(received):
        try:
            pending.append(_prepare(archive, n, file))
            headers[n] = pending[-1].header
        except StorageError as error:
            outcomes[n] = error

    # Another association may insert or replace the same instance between our read and our
    # write; each retry sees the row it committed. Every round, one of the racers wins. Each
    # attempt writes the blob again: a concurrent delete may have removed it since the last.
    # A SOP Instance UID sent twice in one group waits for the next round (the later copy is
    # then compared with what the earlier one stored, as if sent afterwards).
    while pending:
        this_round: dict[str, _Prepared] = {}
        later: list[_Prepared] = []
        for item in pending:
            uid = item.header.sop_instance_uid
            if uid in this_round:
                later.append(item)
            else:
                this_round[uid] = item
        pending = []
        together = [item for item in this_round.values() if not item.alone]
        batches = [together] if together else []
        batches += [[item] for item in this_round.values() if item.alone]
        for item in (lost for batch in batches for lost in _store(archive, batch, outcomes)):
            item.attempts += 1
            if item.attempts < _MAX_ATTEMPTS:
                pending.append(item)
            else:
                outcomes[item.n] = StorageUnavailable(
                    f"SOP Instance {item.header.sop_instance_uid} kept changing during "
                    f"{_MAX_ATTEMPTS} attempts"
                )
        pending = sorted(pending + later, key=lambda item: item.n)
    done = [outcome for outcome in outcomes if outcome is not None]
    assert len(done) == len(received)  # every file has its outcome
    done = _audit_not_written(archive, received, headers, done)
    _count_transfers(received, headers, done)
    if archive.on_ingest is not None:
        archive.on_ingest(done)  # metrics: what this process's transport received
    return done


@dataclass
class _Prepared:
    """A parsed, checked and hashed file with its instance row's values, ready to store."""

    n: int  # its place in the group
    received: Received
    header: InstanceHeader
    digest: str
    key: str
    values: dict[str, Any]  # every column of the instance row but partition and series_pk
    attempts: int = 0
    # Stored in a transaction of its own: its group's failed on a value the index refused,
    # and only this file's own transaction can say whether the value was its.
    alone: bool = False


def _prepare(archive: Archive, n: int, item: Received) -> _Prepared:
    header = item.header or read_instance_header(item.path, archive.limits)
    _check_announced(header, item.origin)
    if not is_storage_sop_class(header.sop_class_uid):
        raise InvalidInstance(f"SOP Class {header.sop_class_uid} is not a storage SOP class")
    digest, size = item.sha256 or _sha256(item.path)
    key = archive.blob_key(header, digest)
    # Computed here, outside the write transaction: on SQLite that holds the one write lock,
    # which every other association waits for.
    try:
        values = _instance_values(header, key, digest, size, item.origin)
    except RecursionError:
        # Nesting within limits.sequence_max_depth is encoded without recursion trouble; a
        # caller's own header (STOW-RS) read with other limits may not be.
        refuse_too_complex(
            "the data set nests too deep to encode",
            "sequence_max_depth",
            archive.limits.sequence_max_depth,
        )
    return _Prepared(n, item, header, digest, key, values)


def _check_announced(header: InstanceHeader, origin: Origin) -> None:
    # PS3.4 B.2.3: 0xA900 when the data set does not match the SOP Class of the request.
    announced_class = origin.announced_sop_class_uid
    if announced_class is not None and announced_class != header.sop_class_uid:
        raise SOPClassMismatch(
            f"the request announced SOP Class {announced_class}, "
            f"the data set is {header.sop_class_uid}"
        )
    announced_uid = origin.announced_sop_instance_uid
    if announced_uid is not None and announced_uid != header.sop_instance_uid:
        raise SOPClassMismatch(
            f"the request announced SOP Instance {announced_uid}, "
            f"the data set is {header.sop_instance_uid}"
        )


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _same_data_set(archive: Archive, stored: Any, item: _Prepared) -> bool:
    """Whether the ``stored`` instance's blob holds the same data set as ``item`` in the same
    transfer syntax, under another File Meta Information (PS3.10 7.1): the same instance sent
    over C-STORE and over STOW-RS, or by two senders, is a re-send, not new content. Read only
    when the files differ, so only for such re-sends; a blob that cannot be read is not the
    same."""
    if stored.transfer_syntax_uid != item.header.transfer_syntax_uid:
        return False
    try:
        with (
            open(item.received.path, "rb") as new,
            archive.blobs.open(stored.blob_key, tier=stored.tier) as old,
        ):
            new_rest, old_rest = skip_file_meta(new), skip_file_meta(old)
            if new_rest is None or old_rest is None:
                return False
            while True:
                new_rest = new_rest or new.read(_BLOCK)
                old_rest = old_rest or old.read(_BLOCK)
                n = min(len(new_rest), len(old_rest))
                if n == 0:
                    return not new_rest and not old_rest
                if new_rest[:n] != old_rest[:n]:
                    return False
                new_rest, old_rest = new_rest[n:], old_rest[n:]
    except (StorageError, OSError, struct.error) as error:
        log.info("re-sent %s not compared with its stored copy: %s", stored.blob_key, error)
        return False


_BLOCK = 1 << 20


# Built once: executed with parameters on the transaction's connection, these skip the ORM
# and SQLAlchemy's per-statement cache-key work (half of the index time of an ingest).
_STORED_COLUMNS = (
    Instance.id,
    Instance.sha256,
    Instance.blob_key,
    Instance.sop_instance_uid,
    Instance.transfer_syntax_uid,
    Instance.tier,
)
_EXISTING_INSTANCES = select(*_STORED_COLUMNS).where(
    Instance.partition == bindparam("partition"),
    Instance.sop_instance_uid.in_(bindparam("uids", expanding=True)),
)


class _Stored(NamedTuple):
    """A stored instance's row as :data:`_EXISTING_INSTANCES` selects it."""

    id: int
    sha256: str
    blob_key: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    tier: str


@functools.lru_cache(maxsize=64)
def _existing_on_sqlite(dialect: Dialect, count: int) -> DriverStatement:
    """:data:`_EXISTING_INSTANCES` for ``count`` UIDs, compiled for the driver's cursor."""
    uids = [bindparam(f"uid{n}", type_=Instance.sop_instance_uid.type) for n in range(count)]
    statement = select(*_STORED_COLUMNS).where(
        Instance.partition == bindparam("partition"), Instance.sop_instance_uid.in_(uids)
    )
    return DriverStatement(statement, dialect)


def _existing(connection: Connection, partition: str, uids: list[str]) -> dict[str, Any]:
    """The stored instances of ``uids`` by SOP Instance UID. On SQLite one SELECT on the
    driver's cursor, outside a transaction (one statement: its own), as the group's
    statements are (:class:`_GroupStatements`)."""
    if connection.dialect.name != "sqlite":
        rows = connection.execute(_EXISTING_INSTANCES, {"partition": partition, "uids": uids})
        return {row.sop_instance_uid: row for row in rows}
    values = {"partition": partition} | {f"uid{n}": uid for n, uid in enumerate(uids)}
    with contextlib.closing(connection.connection.cursor()) as cursor:
        found = _existing_on_sqlite(connection.dialect, len(uids)).execute(cursor, values)
        return {stored.sop_instance_uid: stored for stored in map(_Stored._make, found)}


# The SET clause comes from the parameters: every column of _instance_values and series_pk.
_REPLACE_INSTANCE = update(Instance).where(
    Instance.id == bindparam("existing_id"), Instance.sha256 == bindparam("existing_sha")
)
_KNOWN_SERIES = (
    select(Series.id, Study.id)
    .join(Study, Series.study_pk == Study.id)
    .where(
        Series.partition == bindparam("partition"),
        Series.series_instance_uid == bindparam("series_uid"),
        Study.study_instance_uid == bindparam("study_uid"),
    )
)
_TOUCH_STUDY = (
    update(Study).where(Study.id == bindparam("study_pk")).values(last_instance_at=bindparam("now"))
)
# PostgreSQL: _KNOWN_SERIES and _TOUCH_STUDY in one statement (one round trip). Its bind names
# are not column names of study (an UPDATE's own, for its SET clause).
_TOUCH_KNOWN_SERIES = (
    update(Study)
    .where(
        Series.study_pk == Study.id,
        Series.partition == bindparam("in_partition"),
        Series.series_instance_uid == bindparam("series_uid"),
        Study.study_instance_uid == bindparam("in_study"),
    )
    .values(last_instance_at=bindparam("now"))
    .returning(Series.id, Study.id)
)


def _store(
    archive: Archive, items: list[_Prepared], outcomes: list[IngestResult | StorageError | None]
) -> list[_Prepared]:
    """One attempt at storing ``items`` (distinct SOP Instance UIDs); sets their outcomes and
    returns those that lost a race with a concurrent sender, to try again."""
    partition = archive.partition
    try:
        with archive.index.read_connection(autocommit=True) as connection:
            existing = _existing(
                connection, partition, [item.header.sop_instance_uid for item in items]
            )
    except StorageUnavailable as error:
        for item in items:
            outcomes[item.n] = error
        return []

    def result(item: _Prepared, outcome: IngestOutcome) -> IngestResult:
        header = item.header
        return IngestResult(
            outcome,
            header.sop_instance_uid,
            header.study_instance_uid,
            item.digest,
            item.values["size"],
        )

    to_write: list[tuple[_Prepared, Any]] = []
    for item in items:
        stored = existing.get(item.header.sop_instance_uid)
        if stored is not None and (
            stored.sha256 == item.digest or _same_data_set(archive, stored, item)
        ):
            outcomes[item.n] = result(item, IngestOutcome.DUPLICATE)
        elif stored is not None and archive.on_duplicate == "keep":
            log.info("kept stored %s, discarded different re-sent content", stored.sop_instance_uid)
            outcomes[item.n] = result(item, IngestOutcome.KEPT_EXISTING)
        else:
            to_write.append((item, stored))

    if not to_write:
        return []
    # The blobs are written while the rows are (an S3 PUT waits mostly for the server); the
    # rows commit only once every blob is stored (_write_rows_once), and no PUT outlives this
    # attempt: a blob deleted below must not appear afterwards.
    puts = archive.blobs.start_put_all(
        [(item.key, item.received.path, item.received.temporary) for item, _stored in to_write]
    )
    try:
        try:
            written, retry, audited = _write_rows(archive, to_write, puts)
        finally:
            puts.wait()
    except _BlobsRefused as refused:
        # Rolled back: the refused files have their answer, the others try again.
        again = []
        for (item, _stored), refusal in zip(to_write, refused.refusals, strict=True):
            if refusal is None:
                again.append(item)
            else:
                outcomes[item.n] = refusal
        _discard_unreferenced(archive, [item.key for item in again])
        return again
    except exc.IntegrityError:
        # Not a race the statements expect (those are answered, not raised): the whole
        # group was rolled back; every file of it tries again.
        written, retry, audited = [], [item for item, _stored in to_write], []
    except exc.DataError as error:
        # The database refused a value (out of its column's range, not encodable): that
        # file cannot be stored, which is its own error, not an outage. A group tries again
        # file by file to find which.
        _discard_unreferenced(archive, [item.key for item, _stored in to_write])
        if len(to_write) > 1:
            for item, _stored in to_write:
                item.alone = True
            return [item for item, _stored in to_write]
        (item, _stored), reason = to_write[0], getattr(error, "orig", None) or error
        log.warning("the index refused a value of %s: %s", item.header.sop_instance_uid, reason)
        outcomes[item.n] = InvalidInstance(
            f"the index cannot hold a value of the data set: {reason}"
        )
        return []
    except BaseException as error:
        _discard_unreferenced(archive, [item.key for item, _stored in to_write])
        if not isinstance(error, StorageError):
            raise
        for item, _stored in to_write:
            outcomes[item.n] = error
        return []

    if archive.audit is not None:
        archive.audit.emit(audited)
    _discard_unreferenced(archive, [item.key for item in retry])
    for item, stored in written:
        if stored is None:
            outcomes[item.n] = result(item, IngestOutcome.STORED)
            continue
        if stored.blob_key != item.key:
            _delete_quietly(archive, stored.blob_key)
        outcomes[item.n] = result(item, IngestOutcome.REPLACED)
    return retry


class _BlobsRefused(Exception):
    """The blob store refused some of a group's blobs: its transaction is rolled back."""

    def __init__(self, refusals: list[StorageUnavailable | None]) -> None:
        super().__init__("blobs refused")
        self.refusals = refusals


def _write_rows(
    archive: Archive, to_write: list[tuple[_Prepared, Any]], puts: PendingPuts
) -> tuple[list[tuple[_Prepared, Any]], list[_Prepared], list[dict[str, Any]]]:
    """:func:`_write_rows_once`; the transfers it began are begun again if it fails."""
    begun: list[tuple[Transfer, str]] = []
    try:
        return _write_rows_once(archive, to_write, puts, begun)
    except BaseException:
        for transfer, study in begun:
            transfer.release(study)
        raise


def _write_rows_once(
    archive: Archive,
    to_write: list[tuple[_Prepared, Any]],
    puts: PendingPuts,
    begun: list[tuple[Transfer, str]],
) -> tuple[list[tuple[_Prepared, Any]], list[_Prepared], list[dict[str, Any]]]:
    """The index rows of ``to_write`` in one transaction: (written, lost a race, the audit
    records of the written ones, to emit after the commit). Their blobs (``puts``) are
    written meanwhile: the events, the audit records and the commit wait for them, and a
    refused one rolls the transaction back (:class:`_BlobsRefused`); so no committed row
    names a blob that is not stored, and the locks the events and the audit records take
    until the commit (``storage/events.py``) are not held while a PUT is waited for.

    A lost race is answered by the statements, not raised, so one file's loss does not undo
    the others': a new instance row is inserted with ON CONFLICT DO NOTHING (the rows of all
    new instances in one multi-row INSERT, whose RETURNING names those inserted), a
    replacement updates only the row it read (its id and SHA-256), so a row changed meanwhile
    matches nothing.
    """
    partition = archive.partition
    written: list[tuple[_Prepared, Any]] = []
    retry: list[_Prepared] = []
    new: list[_Prepared] = []
    with archive.index.write_connection() as connection, _GroupStatements(connection) as hot:
        # Series met earlier in this transaction: their rows exist, the study is touched.
        known_series: dict[tuple[str, str], int] = {}
        rows = []
        for item, stored in to_write:
            header = item.header
            series_key = (header.study_instance_uid, header.series_instance_uid)
            series_pk = known_series.get(series_key)
            if series_pk is None:
                series_pk = _upsert_hierarchy(connection, hot, partition, header)
                known_series[series_key] = series_pk
            values = {**item.values, "series_pk": series_pk}
            if stored is None:
                new.append(item)
                rows.append({"partition": partition, **values})
                continue
            parameters = {"existing_id": stored.id, "existing_sha": stored.sha256, **values}
            if connection.execute(_REPLACE_INSTANCE, parameters).rowcount == 1:
                written.append((item, stored))
            else:
                retry.append(item)
        if rows:
            inserted = hot.insert_new(rows)
            for item in new:
                if item.header.sop_instance_uid in inserted:
                    written.append((item, None))
                else:
                    retry.append(item)
        refusals = puts.wait()
        if any(refusal is not None for refusal in refusals):
            raise _BlobsRefused(refusals)
        # The outbox: one event per instance written, committed with its row (last statement).
        record_events(
            connection, partition, [_stored_event(item, stored) for item, stored in written]
        )
        audited: list[dict[str, Any]] = []
        if archive.audit is not None and written:
            with audit_errors():
                entries = _store_entries(archive, written, begun)
                audited = archive.audit.append(connection, entries)
    return written, retry, audited


def _requestor(archive: Archive, item: Received) -> Requestor:
    return item.requestor or Actor(partition=archive.partition)


def _store_entries(
    archive: Archive, written: list[tuple[_Prepared, Any]], begun: list[tuple[Transfer, str]]
) -> list[tuple[Requestor, AuditEntry]]:
    """One record per (requestor, study) of the instances a transaction wrote: C (Create) when
    all are new, U (Update) when one replaced a stored instance (PS3.15 A.5.3.7); for a
    DIMSE transfer, its begin record if the study is new to it (and the transfers begun)."""
    groups: dict[tuple[Requestor, str], list[tuple[_Prepared, Any]]] = {}
    entries = []
    for item, stored in written:
        study = item.header.study_instance_uid
        transfer = item.received.transfer
        if transfer is not None:
            if transfer.claim(study):
                begun.append((transfer, study))
                entries.append((transfer.requestor, _begun_entry(item.header, transfer)))
            continue
        key = (_requestor(archive, item.received), study)
        groups.setdefault(key, []).append((item, stored))
    for (requestor, study_uid), items in groups.items():
        first = items[0][0]
        entries.append(
            (
                requestor,
                AuditEntry(
                    _store_event(requestor),
                    patient_id=_text(first.header.dataset, "PatientID", 64),
                    study_uids=(study_uid,),
                    instances=len(items),
                    action="U" if any(stored is not None for _item, stored in items) else "C",
                    detail=_origin_detail(first.received.origin),
                ),
            )
        )
    return entries


def _begun_entry(header: InstanceHeader, transfer: Transfer) -> AuditEntry:
    return AuditEntry(
        AuditEvent.STORE_BEGUN,
        patient_id=_text(header.dataset, "PatientID", 64),
        study_uids=(header.study_instance_uid,),
        detail={"service": transfer.service},
    )


def _count_transfers(
    received: Sequence[Received],
    headers: Sequence[InstanceHeader | None],
    done: list[IngestResult | StorageError],
) -> None:
    """Each file of a transfer counted for the record at its end."""
    for item, header, outcome in zip(received, headers, done, strict=True):
        if item.transfer is None:
            continue
        study = header.study_instance_uid if header is not None else ""
        patient = _text(header.dataset, "PatientID", 64) if header is not None else ""
        if isinstance(outcome, StorageError):
            item.transfer.count(study, patient, "refused", str(outcome)[:300])
        elif outcome.outcome == IngestOutcome.STORED:
            item.transfer.count(study, patient, "stored")
        elif outcome.outcome == IngestOutcome.REPLACED:
            item.transfer.count(study, patient, "replaced")
        else:
            item.transfer.count(study, patient, "duplicate")


def _store_event(requestor: Requestor) -> AuditEvent:
    # `hilum import` reads files from disk or media: PS3.15 A.5.3.5 Data Import.
    return AuditEvent.IMPORT if requestor.transport == "cli" else AuditEvent.STORE


def _origin_detail(origin: Origin) -> dict[str, str]:
    return {"calling_ae_title": origin.calling_ae_title} if origin.calling_ae_title else {}


def _audit_not_written(
    archive: Archive,
    received: Sequence[Received],
    headers: Sequence[InstanceHeader | None],
    done: list[IngestResult | StorageError],
) -> list[IngestResult | StorageError]:
    """Record what no index transaction recorded: duplicates (R, Read: Hilum already held
    them, A.5.3.7) and refusals (with the reason), per requestor, study and outcome. If that
    record cannot be written, a duplicate is refused too (its sender retries)."""
    if archive.audit is None:
        return done
    # (requestor, study, action, outcome, reason) -> [instances, patient ID]
    groups: dict[tuple[Requestor, str, str, Outcome, str], list[Any]] = {}
    begun: list[tuple[Transfer, str]] = []
    entries: list[tuple[Requestor, AuditEntry]] = []
    for item, header, outcome in zip(received, headers, done, strict=True):
        transfer = item.transfer
        if transfer is not None:
            # A refusal stores nothing: counted for the transfer's end. A duplicate is an
            # instance Hilum holds: its study's transfer must have begun.
            if _is_duplicate(outcome) and header is not None:
                study = header.study_instance_uid
                if transfer.claim(study):
                    begun.append((transfer, study))
                    entries.append((transfer.requestor, _begun_entry(header, transfer)))
            continue
        if isinstance(outcome, IngestResult):
            if not _is_duplicate(outcome):
                continue
            key = (_requestor(archive, item), outcome.study_instance_uid, "R", Outcome.SUCCESS, "")
        else:
            study = header.study_instance_uid if header is not None else ""
            key = (_requestor(archive, item), study, "", *failure(outcome))
        group = groups.setdefault(key, [0, ""])
        group[0] += 1
        if header is not None:
            group[1] = _text(header.dataset, "PatientID", 64)
    if not groups and not entries:
        return done
    entries += [
        (
            requestor,
            AuditEntry(
                _store_event(requestor),
                outcome,
                reason,
                patient_id=patient_id,
                study_uids=(study_uid,) if study_uid else (),
                instances=count,
                action=action or None,
            ),
        )
        for (requestor, study_uid, action, outcome, reason), (count, patient_id) in groups.items()
    ]
    try:
        with audit_errors(), archive.index.write() as session:
            rows = archive.audit.append(session.connection(), entries)
    except AuditUnavailable as error:
        log.error("audit record of duplicate or refused files not written: %s", error)
        for transfer, study in begun:
            transfer.release(study)
        return [error if _is_duplicate(o) else o for o in done]
    archive.audit.emit(rows)
    return done


def _is_duplicate(outcome: IngestResult | StorageError) -> bool:
    return isinstance(outcome, IngestResult) and outcome.outcome in (
        IngestOutcome.DUPLICATE,
        IngestOutcome.KEPT_EXISTING,
    )


def _stored_event(item: _Prepared, stored: Any) -> NewEvent:
    header = item.header
    return NewEvent(
        EventType.INSTANCE_STORED,
        header.study_instance_uid,
        {
            "SeriesInstanceUID": header.series_instance_uid,
            "SOPInstanceUID": header.sop_instance_uid,
            "SOPClassUID": header.sop_class_uid,
            "Modality": _text(header.dataset, "Modality", 16),
            "outcome": "stored" if stored is None else "replaced",
        },
    )


@functools.cache
def _insert_new(dialect: str) -> Any:
    """INSERT of new instance rows that skips a SOP Instance UID another sender inserted
    meanwhile, and returns the UIDs it did insert."""
    module = postgresql if dialect == "postgresql" else sqlite
    return (
        module.insert(Instance)
        .on_conflict_do_nothing(index_elements=["partition", "sop_instance_uid"])
        .returning(Instance.sop_instance_uid)
    )


@functools.cache
def _sqlite_statements(dialect: Dialect) -> tuple[DriverStatement, ...]:
    """The known-series look-up and the study's touch, compiled for ``dialect`` (SQLite)."""
    return (DriverStatement(_KNOWN_SERIES, dialect), DriverStatement(_TOUCH_STUDY, dialect))


@functools.lru_cache(maxsize=8)
def _sqlite_insert_one(dialect: Dialect, names: tuple[str, ...]) -> DriverStatement:
    """The one-row INSERT of a new instance with the columns ``names`` (the keys of its row:
    partition, series_pk and those of ``_instance_values``), ON CONFLICT DO NOTHING,
    RETURNING its UID, compiled for ``dialect`` (SQLite)."""
    columns = Instance.__table__.c
    statement = (
        sqlite.insert(Instance)
        .values({name: bindparam(name, type_=columns[name].type) for name in names})
        .on_conflict_do_nothing(index_elements=["partition", "sop_instance_uid"])
        .returning(Instance.sop_instance_uid)
    )
    return DriverStatement(statement, dialect)


class _GroupStatements:
    """The statements a group's transaction runs for (nearly) every file. On SQLite, the
    embedded default, through the driver's cursor in the same transaction
    (``storage/index/driver.py``: SQLAlchemy's execution costs 20-40 µs of CPU a statement,
    sqlite3's a few), a new instance's row by a one-row INSERT each (as cheap there as one
    multi-row INSERT: no round trips). On PostgreSQL through SQLAlchemy, the new rows in one
    multi-row INSERT (one round trip), and the known series' look-up and its study's touch in one
    UPDATE."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.cursor: Any = None
        self.sqlite: tuple[DriverStatement, ...] = ()
        if connection.dialect.name == "sqlite":
            self.sqlite = _sqlite_statements(connection.dialect)
            self.cursor = connection.connection.cursor()

    def __enter__(self) -> _GroupStatements:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.cursor is not None:
            self.cursor.close()

    def touch_known_series(
        self, partition: str, series_uid: str, study_uid: str, now: datetime
    ) -> Any:
        """(series_pk, study_pk) of the series in the study, its study's last_instance_at set
        to ``now``; None (nothing touched) when the series is not in the index yet."""
        if self.cursor is None:
            touched = self.connection.execute(
                _TOUCH_KNOWN_SERIES,
                {"in_partition": partition, "series_uid": series_uid, "in_study": study_uid,
                 "now": now},
            )  # fmt: skip
            return touched.one_or_none()
        values = {"partition": partition, "series_uid": series_uid, "study_uid": study_uid}
        known = self.sqlite[0].execute(self.cursor, values).fetchone()
        if known is not None:
            self.sqlite[1].execute(self.cursor, {"study_pk": known[1], "now": now})
        return known

    def insert_new(self, rows: list[dict[str, Any]]) -> set[str]:
        """Insert the new instances' rows; the SOP Instance UIDs inserted (those another
        sender inserted meanwhile are skipped)."""
        if self.cursor is None:
            return set(
                self.connection.execute(_insert_new(self.connection.dialect.name), rows).scalars()
            )
        inserted: set[str] = set()
        for row in rows:
            insert_one = _sqlite_insert_one(self.connection.dialect, tuple(row))
            inserted.update(uid for (uid,) in insert_one.execute(self.cursor, row).fetchall())
        return inserted


def _discard_unreferenced(archive: Archive, keys: list[str]) -> None:
    """Remove blobs whose index rows were not committed, unless a committed row uses one (a
    concurrent sender of the same content won the race and stored the same key). Once one
    cannot be removed (the index or the store is unreachable), the rest are left as well, as
    orphans for ``hilum verify``, rather than each waiting for its own time-out."""
    for n, key in enumerate(keys):
        if not delete_blob_unless_referenced(archive, key):
            if keys[n + 1 :]:
                log.warning("%d more blobs left for `hilum verify`", len(keys) - n - 1)
            return


def _delete_quietly(archive: Archive, key: str) -> None:
    try:
        archive.blobs.delete(key)
    except StorageUnavailable:
        log.warning("could not delete blob %s; `hilum verify` will report it as an orphan", key)


def _text(dataset: Dataset, keyword: str, max_length: int) -> str:
    try:
        value = text_value(dataset, keyword)
    except Exception:  # noqa: BLE001 - pydicom raises any kind on a malformed value
        # Kept as sent in the file and its metadata; only its index column stays empty.
        return ""
    if value is None:
        return ""
    return value.replace("\x00", "").strip()[:max_length]


# PS3.5 6.2: an IS value lies in -2^31 .. 2^31 - 1, the range of the index's INTEGER columns.
_IS_RANGE = range(-(2**31), 2**31)


def _index_integer(dataset: Dataset, keyword: str) -> int | None:
    """The IS value for an index column; None when it is outside the IS range (kept as sent
    in the metadata, but not indexed: PostgreSQL would refuse the whole row)."""
    value = integer_value(dataset, keyword)
    return value if value is not None and value in _IS_RANGE else None


def _insert_ignoring_conflict(connection: Connection, model: type, values: dict[str, Any]) -> None:
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    connection.execute(dialect.insert(model).values(**values).on_conflict_do_nothing())


def _upsert_hierarchy(
    connection: Connection, hot: _GroupStatements, partition: str, header: InstanceHeader
) -> int:
    """Patient, study and series rows for ``header``; returns the series' primary key."""
    now = datetime.now(UTC)
    ds = header.dataset
    # As read from the raw elements by read_instance_header (valid UIDs, at most 64
    # characters): pydicom's conversion of the elements is not needed.
    study_uid = header.study_instance_uid[:UI]
    series_uid = header.series_instance_uid[:UI]
    # The common case, every instance of a series but its first: the rows exist, and only the
    # study's last_instance_at moves. One SELECT and one UPDATE instead of seven statements.
    known_series = hot.touch_known_series(partition, series_uid, study_uid, now)
    if known_series is not None:
        return int(known_series[0])

    patient = {
        "patient_id": _text(ds, "PatientID", 64),
        "issuer_of_patient_id": _text(ds, "IssuerOfPatientID", 64),
    }
    patient_name = _text(ds, "PatientName", 324)
    _insert_ignoring_conflict(
        connection,
        Patient,
        {
            "partition": partition,
            **patient,
            "patient_name": patient_name,
            "patient_name_upper": patient_name.upper(),
            "patient_birth_date": _text(ds, "PatientBirthDate", 8),
            "patient_sex": _text(ds, "PatientSex", 16),
        },
    )
    patient_pk = connection.execute(
        select(Patient.id).filter_by(partition=partition, **patient)
    ).scalar_one()

    _insert_ignoring_conflict(
        connection,
        Study,
        {
            "partition": partition,
            "patient_pk": patient_pk,
            "study_instance_uid": study_uid,
            "study_date": _text(ds, "StudyDate", 8),
            "study_time": _text(ds, "StudyTime", 16),
            "accession_number": _text(ds, "AccessionNumber", 16),
            "study_id": _text(ds, "StudyID", 16),
            "study_description": _text(ds, "StudyDescription", 64),
            "referring_physician_name": _text(ds, "ReferringPhysicianName", 324),
            "created_at": now,
            "last_instance_at": now,
        },
    )
    # Locks the study row on PostgreSQL, so concurrent series updates of
    # ModalitiesInStudy serialise instead of losing one another's modality.
    study_pk, modalities = connection.execute(
        select(Study.id, Study.modalities_in_study)
        .filter_by(partition=partition, study_instance_uid=study_uid)
        .with_for_update()
    ).one()

    modality = _text(ds, "Modality", 16)
    _insert_ignoring_conflict(
        connection,
        Series,
        {
            "partition": partition,
            "study_pk": study_pk,
            "series_instance_uid": series_uid,
            "modality": modality,
            "series_number": _index_integer(ds, "SeriesNumber"),
            "series_description": _text(ds, "SeriesDescription", 64),
            "body_part_examined": _text(ds, "BodyPartExamined", 16),
            "series_date": _text(ds, "SeriesDate", 8),
            "series_time": _text(ds, "SeriesTime", 16),
        },
    )
    series_pk = connection.execute(
        select(Series.id).filter_by(partition=partition, series_instance_uid=series_uid)
    ).scalar_one()

    study_values: dict[str, Any] = {"last_instance_at": now}
    known = [m for m in modalities.split("\\") if m]
    if modality and modality not in known:
        study_values["modalities_in_study"] = "\\".join(sorted([*known, modality]))[:255]
    connection.execute(update(Study).where(Study.id == study_pk).values(**study_values))
    return series_pk


def _instance_values(
    header: InstanceHeader, key: str, digest: str, size: int, origin: Origin
) -> dict[str, Any]:
    """Every column of the instance row but ``partition`` and ``series_pk``."""
    return {
        "sop_instance_uid": header.sop_instance_uid,
        "sop_class_uid": header.sop_class_uid,
        "instance_number": _index_integer(header.dataset, "InstanceNumber"),
        "number_of_frames": header.number_of_frames,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "blob_key": key,
        "size": size,
        "sha256": digest,
        "tier": "",  # a new or replacing blob is written to the primary blob store
        "calling_ae_title": origin.calling_ae_title[:16],
        "received_at": datetime.now(UTC),
        "metadata_json": metadata_json(header.dataset, header.has_pixel_data),
        "frame_table": header.frame_table,
        "frame_ranges": None,  # the JSON form of rows before migration 0013
    }
