"""The delivery side of the change feed: one cursor per subscriber (a webhook, the FHIR push),
leased, with back-off and dead letters.

A subscriber's row (``event_subscriber``) holds the id of the last event it has handled. A
delivery loop (``server/events/delivery.py``; any number of them, in ``hilum serve`` and
``hilum events`` processes on any hosts) delivers to a subscriber only while it holds the row's
lease: the claim is one conditional ``UPDATE`` (free, expired or already ours, and past the
back-off), so two loops never deliver to one subscriber at once, and a killed loop's subscriber
is taken over once its lease expires. Events go out in id order, which is commit order
(``storage/events.py``), and the cursor moves only after the receiver took them: delivery is
at least once (a loop killed between a delivery and its cursor update delivers that event
again), never out of order within a subscriber, except for an administrator's replay.

An event a subscriber refuses ``max_attempts`` times is dead-lettered: recorded in
``event_dead_letter``, and the cursor moves past it, so one poisonous event does not stop the
feed. An administrator may replay it (``POST /api/webhooks/{name}/dead-letters/{id}/replay``):
the loop delivers replayed events before the cursor's next one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from storage.errors import NotFound
from storage.events import as_utc
from storage.index.database import affected_rows
from storage.index.models import EventDeadLetter, EventSubscriber

if TYPE_CHECKING:
    from storage.archive import Archive


@dataclass(frozen=True)
class Cursor:
    """A subscriber's state as the loop that holds its lease sees it."""

    name: str
    position: int
    attempts: int


@dataclass(frozen=True)
class DeadLetter:
    id: int
    subscriber: str
    event_id: int
    state: str  # dead | replay | replayed
    attempts: int
    last_error: str
    dead_at: datetime
    replayed_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event": self.event_id,
            "state": self.state,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "dead_at": self.dead_at.isoformat(),
            "replayed_at": self.replayed_at.isoformat() if self.replayed_at else None,
        }


def ensure_subscribers(archive: Archive, names: Sequence[str], start: int = 0) -> None:
    """Create the cursors of new subscribers at ``start`` (existing ones keep theirs)."""
    if not names:
        return
    with archive.index.write() as session:
        dialect = postgresql if session.connection().dialect.name == "postgresql" else sqlite
        session.execute(
            dialect.insert(EventSubscriber)
            .values(
                [
                    {
                        "name": name,
                        "position": start,
                        "lease_owner": "",
                        "attempts": 0,
                        "last_error": "",
                        "delivered": 0,
                    }
                    for name in names
                ]
            )
            .on_conflict_do_nothing(index_elements=["name"])
        )


def claim(archive: Archive, name: str, owner: str, lease_s: float, now: datetime) -> Cursor | None:
    """Take or renew the lease of subscriber ``name`` for ``owner``: its cursor, or None when
    another loop holds it or its back-off has not passed."""
    with archive.index.write() as session:
        claimed = affected_rows(
            session,
            update(EventSubscriber)
            .where(
                EventSubscriber.name == name,
                or_(
                    EventSubscriber.lease_owner == owner,
                    EventSubscriber.lease_owner == "",
                    EventSubscriber.lease_expires_at < now,
                ),
                or_(
                    EventSubscriber.next_attempt_at.is_(None),
                    EventSubscriber.next_attempt_at <= now,
                ),
            )
            .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s)),
        )
        if claimed != 1:
            return None
        row = session.get(EventSubscriber, name)
        assert row is not None
        return Cursor(name, row.position, row.attempts)


def advance(
    archive: Archive,
    name: str,
    owner: str,
    position: int,
    delivered: int,
    lease_s: float,
    now: datetime,
) -> bool:
    """Move the cursor to ``position`` (``delivered`` more events taken) and renew the lease;
    False when ``owner`` no longer holds it (it must stop: another loop delivers now)."""
    with archive.index.write() as session:
        return (
            affected_rows(
                session,
                update(EventSubscriber)
                .where(EventSubscriber.name == name, EventSubscriber.lease_owner == owner)
                .values(
                    position=func.greatest(EventSubscriber.position, position)
                    if session.connection().dialect.name == "postgresql"
                    else func.max(EventSubscriber.position, position),
                    delivered=EventSubscriber.delivered + delivered,
                    attempts=0,
                    next_attempt_at=None,
                    last_error="",
                    lease_expires_at=now + timedelta(seconds=lease_s),
                ),
            )
            == 1
        )


def record_failure(
    archive: Archive,
    name: str,
    owner: str,
    event_id: int,
    error: str,
    now: datetime,
    *,
    max_attempts: int,
    backoff_s: float,
    max_backoff_s: float,
) -> bool:
    """One failed attempt at event ``event_id`` (the one after the cursor): wait before the
    next, doubling each time; after ``max_attempts`` dead-letter it and move past it. True
    when it was dead-lettered."""
    with archive.index.write() as session:
        row = session.scalars(
            select(EventSubscriber)
            .where(EventSubscriber.name == name, EventSubscriber.lease_owner == owner)
            .with_for_update()
        ).one_or_none()
        if row is None:
            return False
        attempts = row.attempts + 1
        row.last_error = error[:2000]
        if attempts >= max_attempts:
            session.add(
                EventDeadLetter(
                    subscriber=name,
                    event_id=event_id,
                    state="dead",
                    attempts=attempts,
                    last_error=error[:2000],
                    dead_at=now,
                )
            )
            row.position = max(row.position, event_id)
            row.attempts = 0
            row.next_attempt_at = None
            return True
        row.attempts = attempts
        row.next_attempt_at = now + timedelta(
            seconds=min(max_backoff_s, backoff_s * 2 ** (attempts - 1))
        )
        return False


def release(archive: Archive, name: str, owner: str) -> None:
    """Give the lease up (a loop that stops), so another loop need not wait for it to expire."""
    with archive.index.write() as session:
        session.execute(
            update(EventSubscriber)
            .where(EventSubscriber.name == name, EventSubscriber.lease_owner == owner)
            .values(lease_owner="", lease_expires_at=None)
        )


def pending_replays(archive: Archive, name: str) -> list[DeadLetter]:
    return dead_letters(archive, name, state="replay")


def finish_replay(archive: Archive, dead_letter_id: int, error: str | None, now: datetime) -> None:
    """A replayed event taken (``replayed``), or refused again (``dead``, with the error)."""
    with archive.index.write() as session:
        row = session.get(EventDeadLetter, dead_letter_id)
        if row is None:
            return
        row.attempts += 1
        if error is None:
            row.state, row.replayed_at = "replayed", now
        else:
            row.state, row.last_error = "dead", error[:2000]


def replay(archive: Archive, name: str, dead_letter_id: int) -> DeadLetter:
    """Queue a dead-lettered event of subscriber ``name`` for delivery again."""
    with archive.index.write() as session:
        row = session.scalars(
            select(EventDeadLetter)
            .where(EventDeadLetter.id == dead_letter_id, EventDeadLetter.subscriber == name)
            .with_for_update()
        ).one_or_none()
        if row is None:
            raise NotFound(f"no dead letter {dead_letter_id} of {name}")
        row.state = "replay"
        session.flush()
        return _dead_letter(row)


def dead_letters(
    archive: Archive, name: str, *, state: str | None = None, limit: int = 1000
) -> list[DeadLetter]:
    statement = select(EventDeadLetter).where(EventDeadLetter.subscriber == name)
    if state:
        statement = statement.where(EventDeadLetter.state == state)
    statement = statement.order_by(EventDeadLetter.id).limit(limit)
    with archive.index.read() as session:
        return [_dead_letter(row) for row in session.scalars(statement)]


def subscriber_states(archive: Archive) -> dict[str, dict[str, Any]]:
    """Every subscriber's cursor, lease and back-off, with its dead letters counted by state."""
    with archive.index.read() as session:
        counts: dict[str, dict[str, int]] = {}
        for name, state, count in session.execute(
            select(EventDeadLetter.subscriber, EventDeadLetter.state, func.count()).group_by(
                EventDeadLetter.subscriber, EventDeadLetter.state
            )
        ):
            counts.setdefault(name, {})[state] = count
        return {
            row.name: {
                "position": row.position,
                "delivered": row.delivered,
                "attempts": row.attempts,
                "next_attempt_at": _iso(row.next_attempt_at),
                "last_error": row.last_error or None,
                "lease_owner": row.lease_owner or None,
                "lease_expires_at": _iso(row.lease_expires_at),
                "dead_letters": counts.get(row.name, {}),
            }
            for row in session.scalars(select(EventSubscriber).order_by(EventSubscriber.name))
        }


def _iso(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value is not None else None


def _dead_letter(row: EventDeadLetter) -> DeadLetter:
    return DeadLetter(
        id=row.id,
        subscriber=row.subscriber,
        event_id=row.event_id,
        state=row.state,
        attempts=row.attempts,
        last_error=row.last_error,
        dead_at=as_utc(row.dead_at),
        replayed_at=as_utc(row.replayed_at) if row.replayed_at else None,
    )
