"""The change feed (storage/events.py): each state change writes its event in its own
transaction, and ids become visible in commit order, so a cursor never skips an event."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import text

from storage.archive import Archive
from storage.delete import delete_series, delete_study
from storage.events import EventType, NewEvent, changes, prune_events, record_events
from storage.ingest import ingest_file
from tests.factories import ct_instance, write_part10
from tests.waiting import wait_until


def test_stored_and_deleted_instances_are_in_the_feed_in_order(
    archive: Archive, tmp_path: Path
) -> None:
    study, series = generate_uid(), generate_uid()
    other_series = generate_uid()
    sent = []
    for n, series_uid in enumerate([series, series, other_series]):
        ds = ct_instance(study, series_uid, seed=n)
        sent.append(ds.SOPInstanceUID)
        ingest_file(archive, write_part10(ds, tmp_path / f"{n}.dcm"))
    # The same file again is a duplicate: nothing changed, no event.
    ingest_file(archive, tmp_path / "0.dcm")
    delete_series(archive, study, other_series)
    delete_study(archive, study)

    events = changes(archive, 0, 100)
    assert [e.type for e in events] == [
        *[EventType.INSTANCE_STORED] * 3,
        EventType.SERIES_DELETED,
        EventType.STUDY_DELETED,
    ]
    assert [e.payload["SOPInstanceUID"] for e in events[:3]] == sent
    assert {e.payload["outcome"] for e in events[:3]} == {"stored"}
    assert all(e.study_instance_uid == study for e in events)
    assert events[3].payload == {"SeriesInstanceUID": other_series, "instances": 1}
    assert events[4].payload == {"instances": 2}
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # A cursor in the middle, a page limit, a type filter.
    assert [e.id for e in changes(archive, ids[1], 2)] == ids[2:4]
    assert [e.id for e in changes(archive, 0, 10, types=["study.deleted"])] == [ids[4]]
    # Another partition sees none of them.
    assert changes(archive.scoped("elsewhere"), 0, 100) == []


def test_events_are_pruned_after_keep_days(archive: Archive, tmp_path: Path) -> None:
    ingest_file(archive, write_part10(ct_instance(), tmp_path / "a.dcm"))
    (event,) = changes(archive)
    assert prune_events(archive, 1, event.created_at) == 0
    assert prune_events(archive, 1, event.created_at + timedelta(days=1, seconds=1)) == 1
    assert changes(archive) == []
    # Ids are never reused, even with the table empty (a reader's cursor stays valid).
    ingest_file(archive, write_part10(ct_instance(), tmp_path / "b.dcm"))
    (after,) = changes(archive)
    assert after.id > event.id


@pytest.mark.parametrize("backend", ["postgresql-s3"])
def test_a_later_commit_never_takes_a_smaller_id(archive: Archive) -> None:
    """PostgreSQL hands out sequence values at insert, not at commit: a transaction that drew
    id 10 and commits after another's id 11 would be skipped by a reader whose cursor passed
    11. The event writers' lock makes the second writer wait for the first one's commit
    before it draws its id, so ids become visible in order."""
    event = [NewEvent(EventType.STUDY_STABLE, "1.2.3")]
    second_done = threading.Event()

    def second_writer() -> None:
        with archive.index.write() as session:
            record_events(session, archive.partition, event)
        second_done.set()

    with archive.index.write() as first:
        record_events(first, archive.partition, event)  # drew its id; not committed yet
        thread = threading.Thread(target=second_writer)
        thread.start()
        with archive.index.read() as session:
            wait_until(
                lambda: session.execute(
                    text("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                ).first(),
                "the second writer to wait for the event lock",
                timeout_s=30,
            )
        assert not second_done.is_set()
        assert changes(archive) == []  # a reader now sees neither
    thread.join(30)
    first_id, second_id = (e.id for e in changes(archive))
    assert first_id < second_id
