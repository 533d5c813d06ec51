"""The change feed: what happened in the archive, in order, written as a transactional outbox.

Every state change that the rest of the hospital may care about writes its event row in the
same index transaction as the change itself (:func:`record_events`): an instance stored
(``storage/ingest.py``: one event per instance written, all of a commit group in one multi-row
INSERT), a study marked stable (``inference/stability.py``), an AI job queued, started, done or
failed (``storage/jobs.py``), a reviewer's decision (``storage/reviews.py``), a deletion
(``storage/delete.py``). So an event exists if and only if its change committed: a process killed
at any point loses none and invents none. Webhooks, the FHIR push and any poller of ``GET
/api/changes`` read the feed after the commit (``storage/outbox.py``, ``server/events/``).

**Order.** An event's ``id`` is the feed's sequence, and a reader keeps the last id it has seen
as its cursor. That is only safe if ids become visible in increasing order: on PostgreSQL a
sequence hands out ids when a row is inserted, not when its transaction commits, so a
transaction that took id 10 and commits after another one's id 11 would be skipped by a reader
that saw 11 first. Hilum prevents that at the writer: :func:`record_events` takes a
transaction-level advisory lock (``pg_advisory_xact_lock``) right before inserting, as the last
statement of the transaction, and PostgreSQL releases it only after the commit is visible
(``CommitTransaction`` ends the transaction in the proc array before releasing locks). So the
next writer's ids are drawn after every smaller id is visible, and ids are visible in order.
The lock is held only from the insert to the end of the commit (one WAL flush); every other
statement of the transaction runs before it, unserialised. The ORM's pending changes are
flushed before the lock is taken, so a lock holder never waits for a row lock, and no deadlock
can form with it. On SQLite, write transactions are serial already (``BEGIN IMMEDIATE``).

Events are kept ``[events] keep_days`` and then pruned (:func:`prune_events`).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from storage.errors import InvalidQuery
from storage.index.database import affected_rows
from storage.index.driver import DriverStatement
from storage.index.models import Event

if TYPE_CHECKING:
    from storage.archive import Archive


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    # SQLite keeps no time zone; every time Hilum writes is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# pg_advisory_xact_lock key of the event writers (any constant; "HILUMEVT" in ASCII).
_EVENT_WRITE_LOCK = 0x48494C554D455654


class EventType(enum.StrEnum):
    INSTANCE_STORED = "instance.stored"  # a new instance, or new content under its UID
    STUDY_STABLE = "study.stable"  # no new instance for [inference] stable_after_s
    AI_QUEUED = "ai.queued"
    AI_STARTED = "ai.started"  # a worker claimed the job
    AI_COMPLETED = "ai.completed"  # the job's SEG and SR are stored; its findings indexed
    AI_FAILED = "ai.failed"  # failed for good (a failed attempt that is retried is not)
    AI_REVIEWED = "ai.reviewed"  # a reviewer accepted or rejected a finding
    STUDY_DELETED = "study.deleted"
    SERIES_DELETED = "series.deleted"
    INSTANCE_DELETED = "instance.deleted"


@dataclass(frozen=True)
class NewEvent:
    type: EventType
    study_instance_uid: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChangeEvent:
    """One event of the feed, as readers get it."""

    id: int
    type: str
    partition: str
    study_instance_uid: str
    payload: dict[str, Any]
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "partition": self.partition,
            "StudyInstanceUID": self.study_instance_uid or None,
            "created_at": self.created_at.isoformat(),
            "data": self.payload,
        }


def record_events(
    session: Session | Connection,
    partition: str,
    events: Sequence[NewEvent],
    now: datetime | None = None,
) -> None:
    """Write ``events`` in the caller's write transaction. Call it as the transaction's last
    statement: on PostgreSQL it takes the event writers' lock until the commit (module
    docstring)."""
    if not events:
        return
    if isinstance(session, Session):
        session.flush()  # every row lock this transaction needs, taken before the event lock
        connection = session.connection()
    else:
        connection = session
    created = now or utc_now()
    if connection.dialect.name == "postgresql":
        # The lock and every row in one statement (one round trip; an executemany costs one
        # per row, which measured 10x more than the rows themselves: benchmarks/events.py).
        rows = [
            {"type": str(event.type), "study": event.study_instance_uid, "payload": event.payload}
            for event in events
        ]
        connection.execute(
            _INSERT_EVENTS_POSTGRESQL,
            {
                "events": json.dumps(rows),
                "partition": partition,
                "created_at": created,
                "key": _EVENT_WRITE_LOCK,
            },
        )
        return
    # SQLite: on the driver's cursor, in the same transaction (storage/index/driver.py:
    # SQLAlchemy's execution costs more than the row; every received instance writes one).
    insert_event = _insert_event_on_sqlite(connection.dialect)
    with contextlib.closing(connection.connection.cursor()) as cursor:
        for event in events:
            insert_event.execute(
                cursor,
                {
                    "type": str(event.type),
                    "partition": partition,
                    "study_instance_uid": event.study_instance_uid,
                    "payload": event.payload,
                    "created_at": created,
                },
            )


@functools.cache
def _insert_event_on_sqlite(dialect: Dialect) -> DriverStatement:
    columns = Event.__table__.c
    names = ("type", "partition", "study_instance_uid", "payload", "created_at")
    statement = insert(Event).values(
        {name: bindparam(name, type_=columns[name].type) for name in names}
    )
    return DriverStatement(statement, dialect)


# The lock is a one-row relation of the SELECT: no row reaches the INSERT, which draws its id
# from the sequence, before the lock is held (as storage/audit.py's chain lock).
_INSERT_EVENTS_POSTGRESQL = text(
    "INSERT INTO event (type, partition, study_instance_uid, payload, created_at)"
    " SELECT e.type, :partition, e.study, e.payload, :created_at"
    " FROM (SELECT pg_advisory_xact_lock(:key)) AS event_lock,"
    " ROWS FROM (jsonb_to_recordset(CAST(:events AS jsonb))"
    " AS (type text, study text, payload jsonb)) WITH ORDINALITY AS e(type, study, payload, n)"
    " ORDER BY e.n"
)
MAX_PAGE = 1000


def changes(
    archive: Archive,
    since: int = 0,
    limit: int = 100,
    *,
    types: Sequence[str] = (),
    all_partitions: bool = False,
) -> list[ChangeEvent]:
    """Events after id ``since``, oldest first, at most ``limit`` (1..1000): those of the
    archive's partition, or of every partition (the delivery loops). ``types``: only these."""
    if since < 0 or since >= 2**63:
        raise InvalidQuery("since must be an event id (0 or more)")
    statement = select(Event).where(Event.id > since)
    if not all_partitions:
        statement = statement.where(Event.partition == archive.partition)
    if types:
        statement = statement.where(Event.type.in_(list(types)))
    statement = statement.order_by(Event.id).limit(max(1, min(limit, MAX_PAGE)))
    with archive.index.read() as session:
        return [_event(row) for row in session.scalars(statement)]


def event_by_id(archive: Archive, event_id: int) -> ChangeEvent | None:
    with archive.index.read() as session:
        row = session.get(Event, event_id)
        return None if row is None else _event(row)


def last_event_id(archive: Archive) -> int:
    """The newest event's id (0 when there is none)."""
    with archive.index.read() as session:
        return int(session.scalar(select(func.coalesce(func.max(Event.id), 0))) or 0)


def prune_events(archive: Archive, keep_days: float, now: datetime | None = None) -> int:
    """Delete events older than ``keep_days``; how many."""
    cutoff = (now or utc_now()) - timedelta(days=keep_days)
    with archive.index.write() as session:
        return affected_rows(session, delete(Event).where(Event.created_at < cutoff))


def _event(row: Event) -> ChangeEvent:
    return ChangeEvent(
        id=row.id,
        type=row.type,
        partition=row.partition,
        study_instance_uid=row.study_instance_uid,
        payload=dict(row.payload or {}),
        created_at=as_utc(row.created_at),
    )


@functools.cache
def event_types() -> tuple[str, ...]:
    return tuple(str(t) for t in EventType)
