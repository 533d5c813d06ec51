"""The orphan janitor (issue 17): blobs written but never committed, removed once older than a
safety margin, with a log line and an audit record; run periodically by the long-running
processes and on demand by ``hilum verify --repair``.

A store writes its blob before its index rows; when the database dies in between, ingest cannot
tell whether a concurrent sender committed the same key, so it leaves the blob
(``storage/verify.py``). Such an orphan is harmless but takes space and makes ``hilum verify``
exit 1; the janitor takes it away once it is older than ``[storage] orphan_grace_s``, so that a
store still in progress (its blob written, its transaction not yet committed) never loses it.

Which process sweeps: ``hilum serve`` and every ``hilum worker`` run the loop; on PostgreSQL
each sweep first takes a session advisory lock without waiting (``Index.alone``), so that at
most one process sweeps at a time and the others skip their turn (SQLite: one process,
``hilum serve``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sqlalchemy import select

from storage.archive import Archive
from storage.audit import Actor, AuditEntry, AuditEvent, Outcome, Requestor
from storage.errors import StorageError
from storage.index.models import Instance
from storage.verify import VerifyReport, remove_orphans

log = logging.getLogger(__name__)

# pg_try_advisory_lock key of the sweep (any constant unique to Hilum: "HILUMORP").
SWEEP_LOCK = 0x48494C554D4F5250
# Keys checked against the index per query.
_BATCH = 1000


@dataclass
class SweepReport:
    """What one sweep found and did; ``held_elsewhere``: another process was sweeping."""

    candidates: int = 0  # unreferenced blobs older than the margin when listed
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # could not be removed now
    held_elsewhere: bool = False


def sweep_orphans(
    archive: Archive,
    *,
    grace_s: float,
    now: float,
    requestor: Requestor | None = None,
) -> SweepReport:
    """Remove every blob no index row references that was last written over ``grace_s``
    seconds before ``now`` (POSIX time): listed from the store, checked against the index in
    batches (memory does not grow with the archive), each deleted only if still unreferenced.
    Records what was removed in the audit trail as ``requestor`` (Hilum itself by default)."""
    report = SweepReport()
    with archive.index.alone(SWEEP_LOCK) as held:
        if not held:
            report.held_elsewhere = True
            return report
        for batch in _batches(
            (key, modified)
            for key, modified in archive.blobs.list_modified()
            if now - modified > grace_s
        ):
            unreferenced = _unreferenced(archive, [key for key, _ in batch])
            found = VerifyReport(
                orphans=sorted(unreferenced),
                orphan_modified={key: modified for key, modified in batch if key in unreferenced},
            )
            report.candidates += len(found.orphans)
            remove_orphans(archive, found, grace_s=grace_s, now=now)
            report.removed += found.removed
            report.kept += found.orphans
    record_removal(archive, report.removed, grace_s, requestor)
    if report.candidates:
        log.warning(
            "orphan janitor: removed %d orphan blobs older than %.0f s, %d left (%s)",
            len(report.removed),
            grace_s,
            len(report.kept),
            "not written by Hilum, or the store refused" if report.kept else "none",
        )
    return report


def record_removal(
    archive: Archive, removed: list[str], grace_s: float, requestor: Requestor | None = None
) -> None:
    """The audit record of orphan blobs removed (PS3.15 A.5.3.8, action D): which keys, why.
    No patient is named: an orphan's header was never indexed. A record that cannot be
    written is logged; the blobs are gone either way."""
    if not removed:
        return
    entry = AuditEntry(
        AuditEvent.ORPHANS_REMOVED,
        Outcome.SUCCESS,
        instances=len(removed),
        detail={"blobs": "\\".join(removed), "grace_s": int(grace_s)},
    )
    try:
        archive.record(requestor or Actor(), entry)
    except StorageError as error:
        log.error("audit record of %d removed orphan blobs not written: %s", len(removed), error)


def _batches(items: Iterator[tuple[str, float]]) -> Iterator[list[tuple[str, float]]]:
    batch: list[tuple[str, float]] = []
    for item in items:
        batch.append(item)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _unreferenced(archive: Archive, keys: list[str]) -> set[str]:
    with archive.index.read() as session:
        referenced = set(
            session.execute(select(Instance.blob_key).where(Instance.blob_key.in_(keys))).scalars()
        )
    return set(keys) - referenced


class OrphanJanitor:
    """The periodic sweep of a long-running process: every ``interval_s`` seconds (the first
    one ``interval_s`` after start), :func:`sweep_orphans` with ``clock()`` as now."""

    def __init__(
        self,
        archive: Archive,
        *,
        interval_s: float,
        grace_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.archive = archive
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.clock = clock

    def sweep(self) -> SweepReport | None:
        """One sweep now; None when the index or the store could not be read (logged: the next
        turn tries again)."""
        try:
            return sweep_orphans(self.archive, grace_s=self.grace_s, now=self.clock())
        except StorageError as error:
            log.warning("orphan janitor: sweep skipped, %s; next in %.0f s", error, self.interval_s)
            return None

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            self.sweep()

    def start(self) -> tuple[threading.Event, threading.Thread]:
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop,), name="orphan-janitor", daemon=True)
        thread.start()
        return stop, thread
