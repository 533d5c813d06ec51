"""The audit trail: every access to patient data and every security-relevant change, recorded
in an append-only, hash-chained table and written as JSON lines (PS3.15 Annex A.5).

Each :class:`AuditRecord <storage.index.models.AuditRecord>` row says who (the principal's kind
and name, the API token's id), from where (address, transport, request or association id), what
(the event, partition, patient ID, Study Instance UIDs, number of instances), when (UTC) and the
outcome (PS3.15 A.5.1 EventOutcomeIndicator, and the reason of a failure). Its ``hash`` is the
SHA-256 of the previous record's hash and the canonical JSON of the record (:func:`record_hash`),
so altering, inserting or removing a record breaks the chain at that record; ``hilum audit
verify`` (:func:`verify_chain`) walks it.

Appends are serialised so that concurrent writers (several DIMSE and web processes on one
PostgreSQL) never fork the chain: on PostgreSQL a transaction-scoped advisory lock, on SQLite the
database's one write lock (every write transaction begins IMMEDIATE; a lone INSERT holds it
from its start). The record is written in the same transaction as the action where there is one
(a store's index rows: the audit rows ride in the group commit's transaction), else in its own,
before the answer is sent: a failure to write it fails the operation (:class:`AuditUnavailable`,
a :class:`StorageUnavailable`: HTTP 503, DIMSE 0xA700 / 0xA701), so nothing is accessed
unaudited.

The JSON line of each record (after its commit) follows the structure of the DICOM audit
messages (PS3.15 A.5.3, the RFC 3881 / ATNA schema): EventIdentification with the DCM EventID
and EventTypeCode, ActiveParticipant, AuditSourceIdentification and
ParticipantObjectIdentification; the database row stays the authority, the lines are a copy for
a SIEM or a syslog collector.

Hook points for the other parts of Hilum: :meth:`AuditTrail.record` with an :class:`AuditEntry`
for any event, and the helpers :func:`login_entry`, :func:`security_change_entry`,
:func:`export_entry` and :func:`deidentified_copy_entry`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol

import psycopg
from psycopg import errors as psycopg_errors
from psycopg import pq
from sqlalchemy import Connection, QueuePool, RowMapping, exc, select

from storage.errors import StorageUnavailable
from storage.grouping import Groups
from storage.index.database import Index, database_errors
from storage.index.models import DEFAULT_PARTITION, Patient, Study
from storage.index.models import AuditRecord as AuditRow

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # the "previous hash" of the first record
# pg_advisory_xact_lock key of the chain's head (any constant unique to Hilum: "HILUMAUD").
CHAIN_LOCK = 0x48494C554D415544 - (1 << 63)


class AuditUnavailable(StorageUnavailable):
    """The audit record could not be written: the operation is refused, not done unaudited."""


class Outcome(IntEnum):
    """PS3.15 A.5.1 / RFC 3881 EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # refused: bad request, not found, not allowed
    SERIOUS_FAILURE = 8  # could not be done: storage unavailable
    MAJOR_FAILURE = 12


class AuditEvent(StrEnum):
    STORE = "store"  # C-STORE, STOW-RS, the upload page, the AI worker's results
    STORE_BEGUN = "store-begun"  # a DIMSE association's first instance of a study
    IMPORT = "import"  # `hilum import`
    QUERY = "query"  # C-FIND, QIDO-RS, the worklist
    RETRIEVE = "retrieve"  # C-MOVE, C-GET, WADO-RS, WADO-URI
    VIEW = "view"  # the UI's study page
    DELETE = "delete"  # DELETE of a study, series or instance
    EXPORT = "export"  # `hilum export` (hook)
    DEIDENTIFIED_COPY = "deidentified-copy"  # research copies (hook)
    LOGIN = "login"  # hook
    LOGOUT = "logout"  # hook
    USER_CHANGE = "user-change"  # hook
    TOKEN_CHANGE = "token-change"  # hook
    PARTITION_CHANGE = "partition-change"  # hook
    CONFIG_CHANGE = "config-change"  # hook: AE permissions, peers, settings
    AUDIT_READ = "audit-read"  # GET /api/audit and the audit page
    SECURITY_ALERT = "security-alert"  # hook: refused access and the like
    ORPHANS_REMOVED = "orphans-removed"  # the orphan janitor, `hilum verify --repair`


@dataclass(frozen=True)
class Code:
    """A coded entry (PS3.3 8.8): code value, scheme (DCM: PS3.16 Annex D), meaning."""

    value: str
    meaning: str
    scheme: str = "DCM"

    def json(self) -> dict[str, str]:
        return {"csd-code": self.value, "codeSystemName": self.scheme, "originalText": self.meaning}


@dataclass(frozen=True)
class EventKind:
    """How an :class:`AuditEvent` is told in PS3.15 A.5.3: EventID, the usual EventActionCode,
    EventTypeCode, and the role of the requestor in the transfer."""

    event_id: Code
    action: str  # C R U D E
    type_code: Code | None = None
    requestor_role: Code | None = None


_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
_SECURITY_ALERT = Code("110113", "Security Alert")
_USER_AUTHENTICATION = Code("110114", "User Authentication")
_SOURCE = Code("110153", "Source Role ID")
_DESTINATION = Code("110152", "Destination Role ID")

EVENT_KINDS: dict[AuditEvent, EventKind] = {
    # A.5.3.7: C = the receiver did not hold the instances (U replaced, R already held).
    AuditEvent.STORE: EventKind(_TRANSFERRED, "C", requestor_role=_SOURCE),
    # A.5.3.3: the intent; its DICOM Instances Transferred follows when the transfer completes.
    AuditEvent.STORE_BEGUN: EventKind(
        Code("110102", "Begin Transferring DICOM Instances"), "E", requestor_role=_SOURCE
    ),
    AuditEvent.IMPORT: EventKind(Code("110107", "Import"), "C"),  # A.5.3.5 Data Import
    AuditEvent.QUERY: EventKind(Code("110112", "Query"), "E"),  # A.5.3.10
    # A.5.3.7, Hilum being the source: R.
    AuditEvent.RETRIEVE: EventKind(_TRANSFERRED, "R", requestor_role=_DESTINATION),
    AuditEvent.VIEW: EventKind(Code("110103", "DICOM Instances Accessed"), "R"),  # A.5.3.6
    AuditEvent.DELETE: EventKind(Code("110105", "DICOM Study Deleted"), "D"),  # A.5.3.8
    AuditEvent.EXPORT: EventKind(Code("110106", "Export"), "R"),  # A.5.3.4 Data Export
    AuditEvent.DEIDENTIFIED_COPY: EventKind(Code("110106", "Export"), "R"),
    AuditEvent.LOGIN: EventKind(_USER_AUTHENTICATION, "E", Code("110122", "Login")),  # A.5.3.12
    AuditEvent.LOGOUT: EventKind(_USER_AUTHENTICATION, "E", Code("110123", "Logout")),
    # A.5.3.11 Security Alert with the PS3.16 CID 403 type of the change.
    AuditEvent.USER_CHANGE: EventKind(
        _SECURITY_ALERT, "E", Code("110137", "User Security Attributes Changed")
    ),
    AuditEvent.TOKEN_CHANGE: EventKind(
        _SECURITY_ALERT, "E", Code("110137", "User Security Attributes Changed")
    ),
    AuditEvent.PARTITION_CHANGE: EventKind(
        _SECURITY_ALERT, "E", Code("110129", "Security Configuration")
    ),
    AuditEvent.CONFIG_CHANGE: EventKind(
        _SECURITY_ALERT, "E", Code("110129", "Security Configuration")
    ),
    AuditEvent.AUDIT_READ: EventKind(Code("110101", "Audit Log Used"), "R"),  # A.5.3.2
    AuditEvent.SECURITY_ALERT: EventKind(
        _SECURITY_ALERT, "E", Code("110132", "Use of Restricted Function")
    ),
    # A.5.3.8 with action D: received bytes never indexed (no study, no patient known).
    AuditEvent.ORPHANS_REMOVED: EventKind(Code("110105", "DICOM Study Deleted"), "D"),
}


class Requestor(Protocol):
    """Who asks: ``server.context.RequestContext`` (read through these attributes only, so that
    ``storage`` does not depend on ``server``)."""

    @property
    def principal(self) -> Any: ...  # .kind, .name, .token_id
    @property
    def address(self) -> str: ...
    @property
    def transport(self) -> str: ...
    @property
    def partition(self) -> str: ...
    @property
    def request_id(self) -> str: ...


@dataclass(frozen=True)
class ActorPrincipal:
    kind: str
    name: str
    token_id: str | None = None


@dataclass(frozen=True)
class Actor:
    """A :class:`Requestor` made in ``storage``: Hilum itself, for a store whose caller named
    nobody (a benchmark, a maintenance script): recorded, never skipped."""

    principal: ActorPrincipal = ActorPrincipal("system", "hilum")
    address: str = ""
    transport: str = "internal"
    partition: str = DEFAULT_PARTITION
    request_id: str = ""


@dataclass(frozen=True)
class AuditEntry:
    """What happened, to whom: one record (or one per patient, when ``patient_id`` is None and
    the studies belong to several: PS3.15 A.5.3 messages each concern a single patient)."""

    event: AuditEvent
    outcome: Outcome = Outcome.SUCCESS
    reason: str = ""  # why it failed (EventOutcomeDescription)
    # None: looked up from the studies (one record per patient); "" none concerned.
    patient_id: str | None = ""
    study_uids: tuple[str, ...] = ()
    instances: int = 0
    action: str | None = None  # EventActionCode; None: the event's usual one
    # The rest: the query, the SOP Class, the AE titles, the object changed... Strings and
    # integers only (canonical JSON).
    detail: Mapping[str, Any] = field(default_factory=dict)


class Transfer:
    """A sender's transfer of instances over one DIMSE association (or one ``hilum import``),
    audited per study as PS3.15 A.5.3.3 and A.5.3.7 describe it: a Begin Transferring DICOM
    Instances record in the index transaction that stores (or finds already stored) the
    study's first instance, so no instance is held unaudited; a DICOM Instances Transferred
    record with the counts when the association ends ("the time when the transfer has
    completed"). Two records per study and association instead of one per instance: the later
    instances write none. (With several threads, as ``hilum import`` has, an instance stored
    while its study's begin record is in another thread's uncommitted transaction is covered
    by that record, or, if that transaction fails, only by the end record.)"""

    def __init__(
        self, requestor: Requestor, event: AuditEvent = AuditEvent.STORE, service: str = "C-STORE"
    ) -> None:
        self.requestor = requestor
        self.event = event  # of the completion record: STORE, or IMPORT for `hilum import`
        self.service = service
        self._lock = threading.Lock()  # `hilum import` stores from several threads
        self.begun: set[str] = set()  # studies whose begin record is written (or being)
        # study -> {"stored", "replaced", "duplicate", "refused": count}; patient IDs; a reason
        self.counts: dict[str, dict[str, int]] = {}
        self.patients: dict[str, str] = {}
        self.reasons: dict[str, str] = {}

    def claim(self, study: str) -> bool:
        """True the first time: the caller writes the study's begin record (and calls
        :meth:`release` if its transaction fails)."""
        with self._lock:
            if study in self.begun:
                return False
            self.begun.add(study)
            return True

    def release(self, study: str) -> None:
        with self._lock:
            self.begun.discard(study)

    def count(self, study: str, patient_id: str, outcome: str, reason: str = "") -> None:
        with self._lock:
            self._count(study, patient_id, outcome, reason)

    def _count(self, study: str, patient_id: str, outcome: str, reason: str) -> None:
        counts = self.counts.setdefault(study, {})
        counts[outcome] = counts.get(outcome, 0) + 1
        if patient_id:
            self.patients[study] = patient_id
        if reason:
            self.reasons.setdefault(study, reason)

    def completion_entries(self) -> list[AuditEntry]:
        """One DICOM Instances Transferred per study: C when new instances were stored, U
        when only stored ones were replaced, R when every one was held already (A.5.3.7)."""
        entries = []
        for study, counts in self.counts.items():
            stored, replaced = counts.get("stored", 0), counts.get("replaced", 0)
            duplicate, refused = counts.get("duplicate", 0), counts.get("refused", 0)
            action = "C" if stored else "U" if replaced else "R"
            reason = ""
            if refused:
                first = self.reasons.get(study, "")
                reason = f"{refused} instance(s) refused" + (
                    f", the first: {first}" if first else ""
                )
            entries.append(
                AuditEntry(
                    self.event,
                    Outcome.MINOR_FAILURE if refused else Outcome.SUCCESS,
                    reason[:1000],
                    patient_id=self.patients.get(study, ""),
                    study_uids=(study,) if study else (),
                    instances=stored + replaced + duplicate,
                    action=action,
                    detail={"service": self.service, **{k: v for k, v in counts.items() if v}},
                )
            )
        return entries


def failure(error: BaseException) -> tuple[Outcome, str]:
    """The outcome and reason that ``error`` makes of an operation."""
    serious = isinstance(error, StorageUnavailable)
    return (Outcome.SERIOUS_FAILURE if serious else Outcome.MINOR_FAILURE), str(error)[:1000]


# -- the chain ------------------------------------------------------------------------------

HASHED_FIELDS = (
    "id",
    "recorded_at",
    "event",
    "action",
    "outcome",
    "reason",
    "principal_kind",
    "principal_name",
    "token_id",
    "address",
    "transport",
    "request_id",
    "partition",
    "patient_id",
    "study_uids",
    "instances",
    "detail",
    "previous_hash",
)


def _text(value: str) -> str:
    """``value`` as a text column can hold it: a NUL (which a hostile request may carry, and
    PostgreSQL's text refuses) becomes U+FFFD, so that the refusal is still recorded."""
    return value.replace("\x00", "\ufffd")


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# The JSON lines: compact, keys in the order the message is built (PS3.15 A.5.1's).
_LINE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 as is: one text per value (RFC 8785's aim for these
    types: strings and integers)."""
    return _CANONICAL.encode(value)


def record_hash(row: Mapping[str, Any] | RowMapping) -> str:
    """SHA-256 of the previous record's hash and this record's canonical JSON."""
    body = _canonical_record(row)
    return hashlib.sha256((row["previous_hash"] + body).encode()).hexdigest()


def _json_text(value: str) -> str:
    """``value`` as :func:`canonical_json` writes it (and the JSON lines: the same escapes):
    quoted as is when nothing in it needs an escape (the usual UIDs, names, addresses)."""
    if value.isprintable() and '"' not in value and "\\" not in value:
        return '"' + value + '"'
    return _CANONICAL.encode(value)


def _canonical_record(row: Mapping[str, Any] | RowMapping) -> str:
    """``canonical_json`` of the record's hashed fields: the same text, written field by field
    in the sorted order (without the generic encoder's set-up per call) when every field has
    its column's type and no text but the detail needs an escape; else by the encoder."""
    texts = (
        row["action"],
        row["address"],
        row["event"],
        row["partition"],
        row["patient_id"],
        row["previous_hash"],
        row["principal_kind"],
        row["principal_name"],
        row["reason"],
        row["recorded_at"],
        row["request_id"],
        row["study_uids"],
        row["token_id"],
        row["transport"],
    )
    detail, number, instances, outcome = row["detail"], row["id"], row["instances"], row["outcome"]
    try:
        probe = "".join(texts)
    except TypeError:  # not all texts
        probe = "\x00"
    if (
        type(detail) is not str
        or type(number) is not int
        or type(instances) is not int
        or type(outcome) is not int
        or not probe.isprintable()
        or '"' in probe
        or "\\" in probe
    ):
        return canonical_json({name: row[name] for name in HASHED_FIELDS})
    (action, address, event, partition, patient, previous, kind, name) = texts[:8]
    (reason, recorded, request, studies, token, transport) = texts[8:]
    return (
        f'{{"action":"{action}","address":"{address}","detail":{_CANONICAL.encode(detail)},'
        f'"event":"{event}","id":{number},"instances":{instances},"outcome":{outcome},'
        f'"partition":"{partition}","patient_id":"{patient}","previous_hash":"{previous}",'
        f'"principal_kind":"{kind}","principal_name":"{name}","reason":"{reason}",'
        f'"recorded_at":"{recorded}","request_id":"{request}","study_uids":"{studies}",'
        f'"token_id":"{token}","transport":"{transport}"}}'
    )


def _now() -> str:
    """ISO 8601 UTC with microseconds: ``2026-12-03T18:00:00.000000Z`` (the date and time of
    the second formatted once per second)."""
    global _second  # noqa: PLW0603 (a cache: a second and its text, replaced whole)
    micros = time.time_ns() // 1000
    second, fraction = divmod(micros, 1_000_000)
    cached = _second
    if cached[0] != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        cached = _second = (second, text)
    return f"{cached[1]}.{fraction:06d}Z"


_second: tuple[int, str] = (-1, "")


class JsonLines:
    """Appends each record as one JSON line to a file (``O_APPEND``: one ``write`` per batch,
    so lines of several processes never interleave) or to standard output (containers)."""

    def __init__(self, target: str | Path) -> None:
        self.target = str(target)
        self._lock = threading.Lock()
        self._fd: int | None = None
        if self.target != "-":
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write_lines(self, lines: Sequence[str]) -> None:
        """``lines`` (JSON texts without their newline) in one write."""
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode()
        with self._lock:
            if self._fd is None:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            else:
                os.write(self._fd, data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class AuditTrail:
    """Writes audit records: the table (authority) and the JSON lines (a copy)."""

    def __init__(
        self,
        index: Index,
        json_lines: JsonLines | None = None,
        *,
        enabled: bool = True,
        source_id: str = "HILUM",
        fsync_reads: bool = False,
    ) -> None:
        # PostgreSQL: an engine of its own; SQLite: the index's (open_archive). Closed with
        # the trail.
        self.index = index
        self.json_lines = json_lines
        self.enabled = enabled
        self.source_id = source_id  # AuditSourceID and Hilum's own UserID (its AE title)
        # SQLite: a record of its own ([audit] fsync_reads false) is committed with
        # synchronous=NORMAL on a connection of the index (FULL): flushed with the next FULL
        # commit or checkpoint (PostgreSQL: the trail's engine sets synchronous_commit).
        self._sqlite = index.dialect == "sqlite"
        self._dbapi_error = index.engine.dialect.loaded_dbapi.Error
        self._lazy_sqlite_commit = self._sqlite and not fsync_reads
        # (id, hash) of the newest record this process saw committed: the next append inserts
        # after it in one statement if it is still the chain's head (:meth:`_after_cached_head`)
        self._head: tuple[int, str] | None = None
        self._head_lock = threading.Lock()
        # PostgreSQL: connections of the trail's pool kept checked out between records
        # (taking one from the pool and returning it costs more than the record's insert);
        # fewer than the pool's size, so that the searches and ``verify`` always find one
        # there. SQLite: none kept. In WAL mode a read transaction drops its connection's whole
        # page cache when another connection committed since that connection's last
        # transaction, so a record committed on a connection of the trail's own made the read
        # after it load its pages again. A read's record is written on the read's own
        # connection when the read lends it (:meth:`record`), else on a connection of the
        # index's pool, given back at once (LIFO: the read that follows takes it).
        self._idle: list[_Held] = []
        self._idle_lock = threading.Lock()
        pool = index.engine.pool
        self._idle_max = 0
        if isinstance(pool, QueuePool) and not self._sqlite:
            self._idle_max = max(1, pool.size() - 1)
        # Group commit of the records of concurrent callers (:meth:`_write_group`).
        self._groups: Groups[_Submitted, None] = Groups(
            self._write_group, GROUP_MAX, lambda submitted: len(submitted.items)
        )

    def record(
        self, context: Requestor, *entries: AuditEntry, connection: Connection | None = None
    ) -> None:
        """Write ``entries`` in a transaction of their own, or of a group (:meth:`_write_group`);
        return once they are committed; raise :class:`AuditUnavailable`.

        ``connection``: SQLite, the caller's connection of the index (outside a transaction)
        on which it reads next (``storage.query.search``): when the caller leads its group,
        the group is written and committed on it, so that the read keeps its page cache. Else
        (PostgreSQL, another pool) ignored."""
        if not self.enabled or not entries:
            return
        lent = None
        if (
            connection is not None
            and self._sqlite
            and connection.engine.pool is self.index.engine.pool
            and not connection.in_transaction()
        ):
            lent = connection
        self._groups.submit(_Submitted(lent, [(context, entry) for entry in entries]))

    def in_flight(self) -> int:
        """How many records were handed to :meth:`record` and are not committed (or refused)
        yet: waiting for a leader, or being written."""
        return self._groups.in_flight()

    def _write_group(self, group: list[_Submitted]) -> list[AuditUnavailable | None]:
        """Group commit (``storage/group_commit.py``) of the records of reads: the records of
        every caller waiting when the leader begins (up to :data:`GROUP_MAX` records) in one
        transaction, one commit, one write of their JSON lines. Alone, a caller writes its own
        at once; under load, callers that would have queued for the chain's lock one commit
        each share one. Each caller returns only after the commit that holds its records. A
        group that fails is retried one caller at a time, so that one caller's failure is not
        the others'. All on the leader's lent connection, if it lent one (the others' are
        their threads')."""
        lent = group[0].lent  # the leader's own (storage.grouping)
        try:
            self._write([item for submitted in group for item in submitted.items], lent)
        except AuditUnavailable as error:
            if len(group) == 1:
                return [error]
            outcomes: list[AuditUnavailable | None] = []
            for submitted in group:
                try:
                    self._write(submitted.items, lent)
                except AuditUnavailable as alone:
                    outcomes.append(alone)
                else:
                    outcomes.append(None)
            return outcomes
        return [None] * len(group)

    def _write(self, items: list[tuple[Requestor, AuditEntry]], lent: Connection | None) -> None:
        """``items`` committed together (on ``lent`` if not None), then their JSON lines."""
        try:
            rows = self._record_alone(items, lent)
        except Exception:
            # The failure turned into what it means (the context managers cost a record more
            # than its try when nothing fails).
            with audit_errors(), database_errors():
                raise
        self._write_lines(rows)  # the head advanced by _record_alone

    def _record_alone(
        self, items: Sequence[tuple[Requestor, AuditEntry]], lent: Connection | None = None
    ) -> list[dict[str, Any]]:
        """The records in a transaction of their own, on the driver's connection: this runs
        before every query's answer, and SQLAlchemy's connection and transaction machinery
        cost more than the insert. A connection found broken (the database restarted while it
        sat in the pool: the trail's pool does not ping) is replaced once; at worst, a commit
        whose answer was lost is written twice (a record too many, never a fork)."""
        dbapi_error = self._dbapi_error
        write = self._alone_sqlite if self._sqlite else self._alone_postgresql
        for attempt in (1, 2):
            held = self._take() if lent is None else _Held.lent_by(lent)
            try:
                rows = write(held, items)
            except dbapi_error as error:
                broken = bool(getattr(held.connection, "broken", False))
                self._give_back(held, broken=broken)
                if broken and attempt == 1:
                    continue
                raise AuditUnavailable(
                    f"the audit trail cannot be written, so the operation is refused: {error}"
                ) from error
            except BaseException:
                self._give_back(held, broken=False)
                raise
            with self._idle_lock:
                kept = not held.lent and len(self._idle) < self._idle_max
                if kept:
                    self._idle.append(held)
            if not kept:
                self._give_back(held, broken=False)
            self._advance(rows)
            return rows
        raise AssertionError("unreachable")  # pragma: no cover

    def _take(self) -> _Held:
        """A connection of the trail's, with its cursor: one kept from an earlier record, else
        one from the pool (on PostgreSQL put in autocommit while the trail holds it: a
        record's usual insert is a statement of its own, and toggling the mode per record
        costs more than the insert's own Python)."""
        with self._idle_lock:
            if self._idle:
                return self._idle.pop()
        pooled = self.index.engine.raw_connection()
        try:
            connection: Any = pooled.driver_connection
            if self.index.dialect == "postgresql":
                connection.autocommit = True
            return _Held(pooled, connection, connection.cursor())
        except BaseException:
            pooled.close()
            raise

    def _give_back(self, held: _Held, *, broken: bool) -> None:
        """Return ``held`` to the pool as it was taken (replaced there when ``broken``); a lent
        connection to its lender (its cursor closed; invalidated when ``broken``)."""
        if held.lent:
            with contextlib.suppress(Exception):  # its connection invalidated: closed with it
                held.cursor.close()
            if broken:
                held.pooled.invalidate()
            return
        try:
            held.cursor.close()
            if not broken and self.index.dialect == "postgresql":
                held.connection.autocommit = False
        except Exception:  # noqa: BLE001 (a connection in an unknown state is not reused)
            broken = True
        if broken:
            held.pooled.invalidate()
        held.pooled.close()

    def _alone_sqlite(
        self, held: _Held, items: Sequence[tuple[Requestor, AuditEntry]]
    ) -> list[dict[str, Any]]:
        """Usually one statement, in autocommit (the connection's mode, as SQLAlchemy leaves
        it): the insert after the cached head, which takes the database's write lock as it
        begins (an INSERT's transaction is a write transaction from its start, its snapshot
        taken under the lock) and inserts nothing unless that record is still the head; its
        commit is the statement's end. Then, when it inserted nothing, one transaction begun
        IMMEDIATE: the head read from the table, the insert after it. Without [audit]
        fsync_reads, in synchronous=NORMAL (the connection set back to FULL after)."""
        cursor = held.cursor
        if not self._lazy_sqlite_commit:
            return self._sqlite_records(held, items)
        cursor.execute("PRAGMA synchronous=NORMAL")
        try:
            return self._sqlite_records(held, items)
        finally:
            try:
                cursor.execute("PRAGMA synchronous=FULL")  # the index's (create_index_engine)
            except BaseException:
                # Never back to the pool (or its lender) with its commits unflushed.
                held.pooled.invalidate()
                raise

    def _sqlite_records(
        self, held: _Held, items: Sequence[tuple[Requestor, AuditEntry]]
    ) -> list[dict[str, Any]]:
        cursor, connection = held.cursor, held.connection
        expanded = list(_per_patient(cursor, "?", items))  # read before the write lock
        head = self._head
        if head is not None and len(expanded) <= _AFTER_HEAD_MAX and not connection.in_transaction:
            rows = _rows(expanded, *head)
            cursor.execute(_insert_after(len(rows), "?"), _after_params(rows, head))
            if cursor.rowcount == len(rows):
                return rows
        # The database's one write lock, up front (as every Hilum write transaction).
        cursor.execute("BEGIN IMMEDIATE")
        try:
            rows = self._after_head(cursor, expanded, postgresql=False)
            connection.commit()
            return rows
        except BaseException:
            connection.rollback()
            raise

    def _alone_postgresql(
        self, held: _Held, items: Sequence[tuple[Requestor, AuditEntry]]
    ) -> list[dict[str, Any]]:
        """Usually one round trip: the insert after the cached head, a statement of its own
        (autocommit) that takes the chain lock before it inserts a row (so a writer holding
        the lock, which read the head, is never raced) and inserts nothing unless that record,
        with that hash, is the newest. Its snapshot may predate a record committed while it
        waited for the lock: the ids' primary key refuses the second record after the same
        one (a unique violation). Then, and when nothing was inserted, one transaction: the
        lock, the head read from the table, the insert after it."""
        integrity_error = self.index.engine.dialect.loaded_dbapi.IntegrityError
        cursor, connection = held.cursor, held.connection
        head = self._head
        expanded = list(_per_patient(cursor, "%s", items))
        if head is not None and len(expanded) <= _AFTER_HEAD_MAX:
            rows = _rows(expanded, *head)
            params = _after_params(rows, head, locking=True)
            try:
                inserted = _libpq_insert_after(connection, len(rows), params)
                if inserted is None:  # a text libpq cannot take as is: psycopg's way
                    cursor.execute(_insert_after(len(rows), "%s", locking=True), params)
                    inserted = cursor.rowcount == len(rows)
                if inserted:
                    return rows
            except integrity_error:
                pass  # another writer took the next id first: read the head
        with connection.transaction():
            cursor.execute(_LOCK, (CHAIN_LOCK,))
            return self._after_head(cursor, expanded, postgresql=True)

    def append(
        self, connection: Connection, items: Sequence[tuple[Requestor, AuditEntry]]
    ) -> list[dict[str, Any]]:
        """Insert the records of ``items`` in the caller's write transaction (so they commit
        with the action, or not at all); pass the rows returned to :meth:`emit` after the
        commit. The chain's head is locked until that transaction ends."""
        if not self.enabled or not items:
            return []
        # The driver's own cursor, in the caller's transaction: SQLAlchemy's statement
        # machinery would cost more than the insert.
        postgresql = connection.dialect.name == "postgresql"
        try:
            with contextlib.closing(connection.connection.cursor()) as cursor:
                expanded = list(_per_patient(cursor, "%s" if postgresql else "?", items))
                if postgresql:
                    cursor.execute(_LOCK, (CHAIN_LOCK,))
                # SQLite: this write transaction began IMMEDIATE, holding the write lock.
                rows = self._after_cached_head(cursor, expanded, "%s" if postgresql else "?")
                if rows is None:
                    rows = self._after_head(cursor, expanded, postgresql=postgresql)
                return rows
        except connection.dialect.loaded_dbapi.Error as error:
            raise AuditUnavailable(
                f"the audit trail cannot be written, so the operation is refused: {error}"
            ) from error

    def _after_cached_head(
        self, cursor: Any, expanded: list[_Expanded], marker: str
    ) -> list[dict[str, Any]] | None:
        """Under the chain lock: the records inserted after the head this process last saw
        committed, in one statement that inserts nothing unless that record is still the
        chain's head (the highest id, with that hash); None when it was not (another process
        wrote since, or nothing is cached)."""
        head = self._head
        if head is None or len(expanded) > _AFTER_HEAD_MAX:
            return None
        rows = _rows(expanded, *head)
        cursor.execute(_insert_after(len(rows), marker), _after_params(rows, head))
        return rows if cursor.rowcount == len(rows) else None

    def _after_head(
        self, cursor: Any, expanded: list[_Expanded], *, postgresql: bool
    ) -> list[dict[str, Any]]:
        """Under the chain lock: the head read from the table, the records inserted after
        it."""
        cursor.execute("SELECT id, hash FROM audit_record ORDER BY id DESC LIMIT 1")
        last = cursor.fetchone()
        head = (int(last[0]), str(last[1])) if last is not None else (0, GENESIS)
        rows = _rows(expanded, *head)
        cursor.executemany(
            _INSERT_PG if postgresql else _INSERT_SQLITE,
            [tuple(row[name] for name in _COLUMNS) for row in rows],
        )
        return rows

    def _advance(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Remember the newest committed record as the chain's head (a hint: checked by the
        next insert, never trusted)."""
        if not rows:
            return
        last = rows[-1]
        with self._head_lock:
            if self._head is None or last["id"] > self._head[0]:
                self._head = (last["id"], last["hash"])

    def emit(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """The JSON lines of committed rows. A line that cannot be written is logged: the
        table holds the record."""
        self._advance(rows)
        self._write_lines(rows)

    def _write_lines(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if self.json_lines is None or not rows:
            return
        try:
            self.json_lines.write_lines([audit_line(row, self.source_id) for row in rows])
        except OSError as error:
            log.error("audit JSON lines not written (%d in the table): %s", len(rows), error)

    def close(self) -> None:
        if self.json_lines is not None:
            self.json_lines.close()
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for held in idle:
            self._give_back(held, broken=False)
        self.index.dispose()


_COLUMNS = (*HASHED_FIELDS, "hash")
_DETAIL_FIELDS = "detail_fields"  # a row's key beside its columns (:func:`_rows`)
_INSERT_SQLITE = (
    f"INSERT INTO audit_record ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
)
_INSERT_PG = _INSERT_SQLITE.replace("?", "%s")
_LOCK = "SELECT pg_advisory_xact_lock(%s)"
_AFTER_HEAD_MAX = 64  # records in one conditional insert (19 parameters each)


# Records in one group commit: one conditional insert (:data:`_AFTER_HEAD_MAX`).
GROUP_MAX = 64


@dataclass(frozen=True)
class _Held:
    """A connection the trail holds between records: the pool's (or the SQLAlchemy connection
    its caller lent, :meth:`AuditTrail.record`), the driver's, a cursor."""

    pooled: Any
    connection: Any
    cursor: Any
    lent: bool = False

    @classmethod
    def lent_by(cls, lender: Connection) -> _Held:
        connection: Any = lender.connection.driver_connection
        return cls(lender, connection, connection.cursor(), lent=True)


@dataclass(frozen=True)
class _Submitted:
    """A caller's records for the group commit, and the connection it lends (or None)."""

    lent: Connection | None
    items: list[tuple[Requestor, AuditEntry]]


# A request's context, its entry, the entry's patient ID and studies (one patient each).
_Expanded = tuple[Requestor, AuditEntry, str, tuple[str, ...]]


@functools.cache
def _insert_after(count: int, marker: str, *, locking: bool = False) -> str:
    """INSERT of ``count`` records that inserts nothing unless the record it names (id and
    hash: :func:`_after_params`) is the chain's head. ``locking`` (PostgreSQL, a statement of
    its own): it takes the chain lock itself, before it inserts a row."""
    row = "(" + ", ".join([marker] * len(_COLUMNS)) + ")"
    lock = f", (SELECT pg_advisory_xact_lock({marker})) AS chain_lock" if locking else ""
    return (
        f"INSERT INTO audit_record ({', '.join(_COLUMNS)}) "
        f"SELECT v.* FROM (VALUES {', '.join([row] * count)}) AS v{lock} "
        f"WHERE (SELECT max(id) FROM audit_record) = {marker} "
        f"AND EXISTS (SELECT 1 FROM audit_record WHERE id = {marker} AND hash = {marker})"
    )


def _libpq_insert_after(connection: Any, count: int, params: Sequence[Any]) -> bool | None:
    """PostgreSQL: the locking insert after the head (:func:`_insert_after`) run through the
    connection's libpq wrapper (psycopg's ``pgconn``, the trail holding the connection alone,
    in autocommit), prepared once per session: a blocking ``PQexecPrepared`` (the GIL
    released) costs this process a fraction of the CPU of psycopg's cursor, its adaptation
    and its wait loop. True when the records were inserted, False when nothing was (not the
    head), None when a value cannot travel as UTF-8 text (a NUL; another client encoding):
    then the caller runs it through the cursor. Raises psycopg's errors (a unique violation:
    another writer took the id first)."""
    pgconn = connection.pgconn
    if pgconn.parameter_status(b"client_encoding") != b"UTF8":
        return None
    texts = [str(value) for value in params]
    if any("\x00" in text for text in texts):
        return None
    values = [text.encode() for text in texts]
    name = b"hilum_audit_after_%d" % count
    result = pgconn.exec_prepared(name, values)
    if (
        result.status == pq.ExecStatus.FATAL_ERROR
        and result.error_field(pq.DiagnosticField.SQLSTATE) == b"26000"
    ):  # not prepared in this session yet
        _libpq_check(pgconn.prepare(name, _libpq_insert_text(count), _libpq_types(count)))
        result = pgconn.exec_prepared(name, values)
    _libpq_check(result)
    return result.command_tuples == count


def _libpq_check(result: Any) -> None:
    """Raise the psycopg error of a failed libpq result (as its cursor would)."""
    if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
        try:
            error = psycopg_errors.lookup(sqlstate)
        except KeyError:  # none, or one psycopg does not know
            error = psycopg.DatabaseError
        raise error(result.get_error_message())


@functools.cache
def _libpq_insert_text(count: int) -> bytes:
    """:func:`_insert_after` (locking) with libpq's numbered parameters."""
    pieces = _insert_after(count, "%s", locking=True).split("%s")
    numbered = [f"{piece}${n}" for n, piece in enumerate(pieces[:-1], 1)] + [pieces[-1]]
    return "".join(numbered).encode()


@functools.cache
def _libpq_types(count: int) -> list[int]:
    """The parameters' types (OIDs): bigint, integer or text by column; the lock's key and the
    head's id bigint, its hash text."""
    types = {"id": 20, "outcome": 23, "instances": 23}
    return [types.get(name, 25) for name in _COLUMNS] * count + [20, 20, 20, 25]


def _after_params(
    rows: Sequence[Mapping[str, Any]], head: tuple[int, str], *, locking: bool = False
) -> list[Any]:
    values = [row[name] for row in rows for name in _COLUMNS]
    return [*values, *([CHAIN_LOCK] if locking else []), head[0], head[0], head[1]]


def _rows(expanded: Sequence[_Expanded], last_id: int, previous: str) -> list[dict[str, Any]]:
    """The records of ``expanded``, chained after record ``last_id`` whose hash is
    ``previous``."""
    now = _now()
    rows = []
    for context, entry, patient_id, study_uids in expanded:
        kind = EVENT_KINDS[entry.event]
        principal = context.principal
        last_id += 1
        row: dict[str, Any] = {
            "id": last_id,
            "recorded_at": now,
            "event": entry.event.value,
            "action": entry.action or kind.action,
            "outcome": int(entry.outcome),
            "reason": _text(entry.reason),
            "principal_kind": str(principal.kind),
            "principal_name": _text(str(principal.name))[:255],
            "token_id": str(principal.token_id or ""),
            "address": context.address[:64],
            "transport": str(context.transport),
            "request_id": _text(context.request_id)[:64],
            "partition": context.partition,
            "patient_id": _text(patient_id)[:64],
            "study_uids": _text("\\".join(study_uids)),
            "instances": entry.instances,
            "detail": canonical_json(dict(entry.detail)) if entry.detail else "",
            "previous_hash": previous,
        }
        row["hash"] = previous = record_hash(row)
        # Not a column: the detail as given, so that its JSON line need not parse it again.
        row[_DETAIL_FIELDS] = entry.detail
        rows.append(row)
    return rows


def _looked_up(entry: AuditEntry) -> bool:
    """Whether the patient of ``entry`` is to be looked up from its studies."""
    return entry.patient_id is None and bool(entry.study_uids)


def _per_patient(
    cursor: Any, marker: str, items: Sequence[tuple[Requestor, AuditEntry]]
) -> Iterator[_Expanded]:
    """Each entry with its patient ID; an entry whose patient is to be looked up becomes one
    record per patient of its studies (a study not found stays with patient "")."""
    for context, entry in items:
        if not _looked_up(entry):
            yield context, entry, entry.patient_id or "", entry.study_uids
            continue
        by_study: dict[str, str] = {}
        for start in range(0, len(entry.study_uids), 500):
            uids = entry.study_uids[start : start + 500]
            cursor.execute(
                f"SELECT s.study_instance_uid, p.patient_id FROM {Study.__tablename__} s "
                f"JOIN {Patient.__tablename__} p ON s.patient_pk = p.id "
                f"WHERE s.partition = {marker} "
                f"AND s.study_instance_uid IN ({', '.join([marker] * len(uids))})",
                (context.partition, *uids),
            )
            by_study.update((str(uid), str(patient)) for uid, patient in cursor.fetchall())
        patients: dict[str, list[str]] = {}
        for uid in entry.study_uids:
            patients.setdefault(by_study.get(uid, ""), []).append(uid)
        for patient_id, patient_uids in patients.items():
            yield context, entry, patient_id, tuple(patient_uids)


class audit_errors:  # noqa: N801 (a context manager used like a function)
    """Turns any failure to write the trail into :class:`AuditUnavailable` (with its reason)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, _tb: Any) -> Literal[False]:
        if error is None or isinstance(error, AuditUnavailable):
            return False
        if isinstance(error, StorageUnavailable | exc.DBAPIError):
            reason = getattr(error, "orig", None) or error
            raise AuditUnavailable(
                f"the audit trail cannot be written, so the operation is refused: {reason}"
            ) from error
        return False


# -- the JSON line: PS3.15 A.5 ---------------------------------------------------------------


def audit_message(row: Mapping[str, Any], source_id: str = "HILUM") -> dict[str, Any]:
    """The record as a DICOM audit message (PS3.15 A.5.1 schema, A.5.3 per event), in JSON."""
    event = AuditEvent(row["event"])
    kind = EVENT_KINDS[event]
    identification: dict[str, Any] = {
        "EventID": kind.event_id.json(),
        "EventActionCode": row["action"],
        "EventDateTime": row["recorded_at"],
        "EventOutcomeIndicator": row["outcome"],
    }
    if row["reason"]:
        identification["EventOutcomeDescription"] = row["reason"]
    if kind.type_code is not None:
        identification["EventTypeCode"] = [kind.type_code.json()]
    detail = json.loads(row["detail"]) if row["detail"] else {}
    requestor: dict[str, Any] = {
        "UserID": row["principal_name"],
        "UserIsRequestor": True,
        "UserTypeCode": row["principal_kind"],
    }
    if row["token_id"]:
        requestor["AlternativeUserID"] = f"token:{row['token_id']}"
    if row["address"]:
        # RFC 3881 NetworkAccessPointTypeCode 2: an IP address.
        requestor["NetworkAccessPointTypeCode"] = "2"
        requestor["NetworkAccessPointID"] = row["address"]
    participants = [requestor]
    if kind.requestor_role is not None:
        requestor["RoleIDCode"] = [kind.requestor_role.json()]
        hilum_role = _DESTINATION if kind.requestor_role is _SOURCE else _SOURCE
        participants.append(
            {
                "UserID": detail.get("called_ae_title", source_id),
                "UserIsRequestor": False,
                "RoleIDCode": [hilum_role.json()],
            }
        )
    objects: list[dict[str, Any]] = []
    if row["patient_id"]:
        # RFC 3881: type 1 Person, role 1 Patient, ID type 2 Patient Number.
        objects.append(
            {
                "ParticipantObjectTypeCode": 1,
                "ParticipantObjectTypeCodeRole": 1,
                "ParticipantObjectIDTypeCode": {"csd-code": "2", "codeSystemName": "RFC-3881"},
                "ParticipantObjectID": row["patient_id"],
            }
        )
    for uid in filter(None, row["study_uids"].split("\\")):
        study: dict[str, Any] = {
            # System Object, role Report, ID type Study Instance UID (A.5.3.7, A.5.3.6).
            "ParticipantObjectTypeCode": 2,
            "ParticipantObjectTypeCodeRole": 3,
            "ParticipantObjectIDTypeCode": Code("110180", "Study Instance UID").json(),
            "ParticipantObjectID": uid,
        }
        if row["instances"]:
            count = row["instances"]
            study["ParticipantObjectDetail"] = [{"type": "NumberOfInstances", "value": count}]
        objects.append(study)
    if event is AuditEvent.QUERY:
        # A.5.3.10: the query, the SOP Class UID of the Q/R model (or the QIDO-RS resource).
        objects.append(
            {
                "ParticipantObjectTypeCode": 2,
                "ParticipantObjectTypeCodeRole": 3,
                "ParticipantObjectIDTypeCode": Code("110181", "SOP Class UID").json(),
                "ParticipantObjectID": detail.get("sop_class_uid", detail.get("resource", "")),
                "ParticipantObjectQuery": detail.get("query", ""),
            }
        )
    return {
        "EventIdentification": identification,
        "ActiveParticipant": participants,
        "AuditSourceIdentification": {"AuditSourceID": source_id},
        "ParticipantObjectIdentification": objects,
        "Hilum": {
            "id": row["id"],
            "partition": row["partition"],
            "transport": row["transport"],
            "request_id": row["request_id"],
            "detail": detail,
            "previous_hash": row["previous_hash"],
            "hash": row["hash"],
        },
    }


def audit_line(row: Mapping[str, Any], source_id: str = "HILUM") -> str:
    """``audit_message(row, source_id)`` as its JSON line (without the newline): the same text,
    written from fragments made once per event and source, without the message's
    dictionaries (it runs before every read's answer); the detail parsed from its column
    unless the row holds it as its entry gave it (a row this process wrote)."""
    event = AuditEvent(row["event"])
    head, middle, second = _line_fragments(event)
    reason, token, address = row["reason"], row["token_id"], row["address"]
    number, outcome, instances = row["id"], row["outcome"], row["instances"]
    detail = row["detail"]
    if type(number) is not int or type(outcome) is not int or type(instances) is not int:
        return _LINE.encode(audit_message(row, source_id))
    text = _json_text
    parts = [head, text(row["action"]), ',"EventDateTime":', text(row["recorded_at"])]
    parts += (',"EventOutcomeIndicator":', str(outcome))
    if reason:
        parts += (',"EventOutcomeDescription":', text(reason))
    parts += (middle, text(row["principal_name"]), ',"UserIsRequestor":true,"UserTypeCode":')
    parts.append(text(row["principal_kind"]))
    if token:
        parts += (',"AlternativeUserID":', text(f"token:{token}"))
    if address:
        parts += (',"NetworkAccessPointTypeCode":"2","NetworkAccessPointID":', text(address))
    query = event is AuditEvent.QUERY
    fields: Mapping[str, Any] = {}
    if detail and (query or second):
        fields = row.get(_DETAIL_FIELDS) or json.loads(detail)
    if second is None:
        parts.append("}")
    else:
        parts += (second[0], _any_text(fields.get("called_ae_title", source_id)), second[1])
    parts.append(_LINE_SOURCE.format(text(source_id)))
    objects = []
    if row["patient_id"]:
        objects.append(_LINE_PATIENT + text(row["patient_id"]) + "}")
    count = f',"ParticipantObjectDetail":[{{"type":"NumberOfInstances","value":{instances}}}]'
    for uid in filter(None, row["study_uids"].split("\\")):
        objects.append(_LINE_STUDY + text(uid) + (count if instances else "") + "}")
    if query:
        objects.append(
            _LINE_QUERY
            + _any_text(fields.get("sop_class_uid", fields.get("resource", "")))
            + ',"ParticipantObjectQuery":'
            + _any_text(fields.get("query", ""))
            + "}"
        )
    parts += (",".join(objects), '],"Hilum":{"id":', str(number))
    parts += (',"partition":', text(row["partition"]), ',"transport":', text(row["transport"]))
    parts += (',"request_id":', text(row["request_id"]), ',"detail":', detail or "{}")
    parts += (',"previous_hash":', text(row["previous_hash"]), ',"hash":', text(row["hash"]))
    parts.append("}}")
    return "".join(parts)


def _any_text(value: Any) -> str:
    """A value of a record's detail as its JSON line writes it."""
    return _json_text(value) if type(value) is str else _LINE.encode(value)


def _code_text(code: Code) -> str:
    return _LINE.encode(code.json())


_LINE_SOURCE = (
    '],"AuditSourceIdentification":{{"AuditSourceID":{}}},"ParticipantObjectIdentification":['
)
_LINE_PATIENT = (
    '{"ParticipantObjectTypeCode":1,"ParticipantObjectTypeCodeRole":1,'
    '"ParticipantObjectIDTypeCode":{"csd-code":"2","codeSystemName":"RFC-3881"},'
    '"ParticipantObjectID":'
)
_LINE_STUDY = (
    '{"ParticipantObjectTypeCode":2,"ParticipantObjectTypeCodeRole":3,'
    f'"ParticipantObjectIDTypeCode":{_code_text(Code("110180", "Study Instance UID"))},'
    '"ParticipantObjectID":'
)
_LINE_QUERY = (
    '{"ParticipantObjectTypeCode":2,"ParticipantObjectTypeCodeRole":3,'
    f'"ParticipantObjectIDTypeCode":{_code_text(Code("110181", "SOP Class UID"))},'
    '"ParticipantObjectID":'
)


@functools.cache
def _line_fragments(event: AuditEvent) -> tuple[str, str, tuple[str, str] | None]:
    """The constant text of an event's JSON line: up to its EventActionCode's value; from the
    end of its EventIdentification to the requestor's UserID's value; and, around Hilum's
    own participant's UserID, that participant (when the requestor has a role)."""
    kind = EVENT_KINDS[event]
    head = f'{{"EventIdentification":{{"EventID":{_code_text(kind.event_id)},"EventActionCode":'
    middle = ""
    if kind.type_code is not None:
        middle += f',"EventTypeCode":[{_code_text(kind.type_code)}]'
    middle += '},"ActiveParticipant":[{"UserID":'
    second = None
    if kind.requestor_role is not None:
        hilum_role = _DESTINATION if kind.requestor_role is _SOURCE else _SOURCE
        second = (
            f',"RoleIDCode":[{_code_text(kind.requestor_role)}]}},{{"UserID":',
            f',"UserIsRequestor":false,"RoleIDCode":[{_code_text(hilum_role)}]}}',
        )
    return head, middle, second


# -- entries the protocols make ---------------------------------------------------------------


def query_entry(
    level: str,
    matching: Mapping[str, str],
    *,
    service: str,
    sop_class_uid: str = "",
    outcome: Outcome = Outcome.SUCCESS,
    reason: str = "",
    **more: str,
) -> AuditEntry:
    """A query (A.5.3.10): what was asked (the matching keys with a value), by which service;
    the patient and studies when the query names them with a single value or a UID list."""
    asked = {key: value for key, value in matching.items() if value}
    patient_id = asked.get("PatientID", "")
    if any(c in patient_id for c in "*?\\"):
        patient_id = ""  # a wild card or a list names no one patient
    studies = tuple(filter(None, asked.get("StudyInstanceUID", "").split("\\")))
    detail = {"service": service, "level": level, "query": canonical_json(asked), **more}
    if sop_class_uid:
        detail["sop_class_uid"] = sop_class_uid
    return AuditEntry(
        AuditEvent.QUERY, outcome, reason, patient_id=patient_id, study_uids=studies, detail=detail
    )


def retrieve_entries(
    instances_per_study: Mapping[str, int],
    *,
    service: str,
    **detail: str,
) -> list[AuditEntry]:
    """One record per study retrieved (each of a single patient, looked up), with its number of
    instances (A.5.3.7 from the source's side: R)."""
    return [
        AuditEntry(
            AuditEvent.RETRIEVE,
            patient_id=None,
            study_uids=(study,),
            instances=count,
            detail={"service": service, **detail},
        )
        for study, count in instances_per_study.items()
    ]


def refusal_entry(
    event: AuditEvent,
    error: BaseException,
    *,
    service: str,
    study_uids: Sequence[str] = (),
    **detail: str,
) -> AuditEntry:
    """An operation refused (``error``): recorded with its reason and the studies it named."""
    outcome, reason = failure(error)
    return AuditEntry(
        event,
        outcome,
        reason,
        patient_id=None if study_uids else "",
        study_uids=tuple(study_uids),
        detail={"service": service, **detail},
    )


# -- hook points for the other parts of Hilum ------------------------------------------------


def login_entry(user: str, *, success: bool, reason: str = "", method: str = "") -> AuditEntry:
    """A login attempt (A.5.3.12 User Authentication, EventTypeCode Login): record it with the
    request's context (whose principal is still anonymous on a failure)."""
    return AuditEntry(
        AuditEvent.LOGIN,
        Outcome.SUCCESS if success else Outcome.MINOR_FAILURE,
        reason,
        detail={"user": user, **({"method": method} if method else {})},
    )


def security_change_entry(
    event: AuditEvent, subject: str, change: str, *, outcome: Outcome = Outcome.SUCCESS
) -> AuditEntry:
    """A user, token, partition, AE permission or configuration change (A.5.3.11): ``subject``
    names what changed (a user name, a token id, never a secret), ``change`` how ("created",
    "revoked", "roles admin,radiologist")."""
    if event not in {
        AuditEvent.USER_CHANGE,
        AuditEvent.TOKEN_CHANGE,
        AuditEvent.PARTITION_CHANGE,
        AuditEvent.CONFIG_CHANGE,
    }:
        raise ValueError(f"{event} is not a security change")
    return AuditEntry(event, outcome, detail={"subject": subject, "change": change})


def export_entry(
    study_uids: Sequence[str], instances: int, destination: str, *, deidentified: bool
) -> AuditEntry:
    """An export of studies out of Hilum (A.5.3.4 Data Export): one record per patient."""
    return AuditEntry(
        AuditEvent.EXPORT,
        patient_id=None,
        study_uids=tuple(study_uids),
        instances=instances,
        detail={"destination": destination, "deidentified": int(deidentified)},
    )


def deidentified_copy_entry(
    study_uid: str, instances: int, to_partition: str, project: str
) -> AuditEntry:
    """A de-identified copy of a study into a research partition (recorded in the source
    partition, with the source study and patient: the link back stays in the clinical trail)."""
    return AuditEntry(
        AuditEvent.DEIDENTIFIED_COPY,
        patient_id=None,
        study_uids=(study_uid,),
        instances=instances,
        detail={"to_partition": to_partition, "project": project},
    )


# -- reading and verifying -------------------------------------------------------------------


@dataclass(frozen=True)
class ChainFault:
    record_id: int
    reason: str


@dataclass(frozen=True)
class ChainReport:
    records: int
    first_id: int | None
    last_id: int | None
    fault: ChainFault | None


def verify_chain(index: Index, batch: int = 5000) -> ChainReport:
    """Walk the chain in id order: each record's id follows the previous one's, its
    ``previous_hash`` is the previous record's ``hash``, and its ``hash`` is that of its
    content. The first record may follow pruned ones (its previous hash is then taken as
    given: see docs/operations.md on pruning)."""
    count = 0
    first_id: int | None = None
    previous: RowMapping | None = None
    columns = [getattr(AuditRow, name) for name in (*HASHED_FIELDS, "hash")]
    with database_errors(), index.read() as session:
        while True:
            statement = select(*columns).order_by(AuditRow.id).limit(batch)
            if previous is not None:
                statement = statement.where(AuditRow.id > previous["id"])
            rows = session.connection().execute(statement).mappings().all()
            if not rows:
                break
            for row in rows:
                reason = _chain_fault(previous, row)
                if reason:
                    last = previous["id"] if previous is not None else None
                    fault = ChainFault(row["id"], f"record {row['id']} {reason}")
                    return ChainReport(count, first_id, last, fault)
                if first_id is None:
                    first_id = row["id"]
                previous = row
                count += 1
    return ChainReport(count, first_id, previous["id"] if previous else None, None)


def _chain_fault(previous: RowMapping | None, row: RowMapping) -> str:
    """Why ``row`` does not follow ``previous`` in the chain ("" if it does)."""
    if previous is None:
        if row["id"] == 1 and row["previous_hash"] != GENESIS:
            return "does not start the chain (its previous hash is not the genesis value)"
    elif row["id"] != previous["id"] + 1:
        first, last = previous["id"] + 1, row["id"] - 1
        missing = f"record {first}" if first == last else f"records {first} to {last}"
        return f"follows a gap: {missing} missing"
    elif row["previous_hash"] != previous["hash"]:
        return f"does not chain to record {previous['id']}: that record was altered or replaced"
    if record_hash(row) != row["hash"]:
        return "was altered: its hash does not match its content"
    return ""


@dataclass(frozen=True)
class AuditSearch:
    """``GET /api/audit`` filters: all optional; ``before`` an id (keyset paging, newest
    first)."""

    patient_id: str = ""
    study: str = ""
    user: str = ""
    since: datetime | None = None
    until: datetime | None = None
    partition: str = ""
    before: int | None = None
    limit: int = 100


def search_records(index: Index, search: AuditSearch) -> list[dict[str, Any]]:
    """Records matching ``search``, newest first, at most ``limit``."""
    statement = select(AuditRow).order_by(AuditRow.id.desc()).limit(search.limit)
    if search.patient_id:
        statement = statement.where(AuditRow.patient_id == search.patient_id)
    if search.partition:
        statement = statement.where(AuditRow.partition == search.partition)
    if search.study:
        # One UID among the backslash-separated ones.
        uids = "\\" + AuditRow.study_uids + "\\"
        statement = statement.where(uids.contains("\\" + search.study + "\\", autoescape=True))
    if search.user:
        statement = statement.where(AuditRow.principal_name == search.user)
    if search.since is not None:
        statement = statement.where(AuditRow.recorded_at >= _iso(search.since))
    if search.until is not None:
        statement = statement.where(AuditRow.recorded_at < _iso(search.until))
    if search.before is not None:
        statement = statement.where(AuditRow.id < search.before)
    with database_errors(), index.read() as session:
        found = session.execute(statement).scalars().all()
        return [{name: getattr(r, name) for name in (*HASHED_FIELDS, "hash")} for r in found]


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def open_json_lines(target: str, data_dir: Path) -> JsonLines | None:
    """``[audit] json_lines``: "" a file ``audit.jsonl`` in the data directory, "-" standard
    output, "off" none, else a path."""
    if target == "off":
        return None
    if target == "":
        return JsonLines(data_dir / "audit.jsonl")
    return JsonLines(target)


def studies_of(instances: Iterable[Any]) -> dict[str, int]:
    """Instances (anything with ``study_instance_uid``) counted per study, in first-seen order."""
    counts: dict[str, int] = {}
    for instance in instances:
        counts[instance.study_instance_uid] = counts.get(instance.study_instance_uid, 0) + 1
    return counts
