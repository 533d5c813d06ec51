"""Group commit: files stored by concurrent callers (C-STORE associations) share index
transactions instead of queueing for one each.

The first caller to arrive becomes the leader: it takes every file waiting (its own among
them, up to ``max_group``) and stores them with one :func:`storage.ingest.ingest_files` call:
one look-up, one transaction, one commit (one fsync of the SQLite log). Callers that arrive
meanwhile wait; when the leader's own file is done it hands the lead to the first of them, who
takes all that gathered while it waited. So under load each commit serves several
associations, and alone a caller pays nothing more than before. A result is final only after
the commit: nobody is answered before their file is durable and indexed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from storage.archive import Archive
from storage.errors import StorageError, StorageUnavailable
from storage.ingest import IngestResult, Received, ingest_files

log = logging.getLogger(__name__)

# Files per transaction: enough to absorb a burst from many associations, few enough that
# one transaction's rows and files stay small.
MAX_GROUP = 64


@dataclass
class _Waiting:
    received: Received
    done: threading.Event = field(default_factory=threading.Event)
    outcome: IngestResult | StorageError | None = None


class GroupCommit:
    """Stores files for many threads, several per index transaction."""

    def __init__(self, archive: Archive, max_group: int = MAX_GROUP) -> None:
        self.archive = archive
        self.max_group = max_group
        self._lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._leader = False
        # What was stored, in how many groups (each one index transaction): for the logs.
        self.files = 0
        self.groups = 0

    def ingest(self, received: Received) -> IngestResult:
        """Store one file (as :func:`storage.ingest.ingest_file` does); raise its
        :class:`StorageError`."""
        me = _Waiting(received)
        with self._lock:
            self._waiting.append(me)
            leading = not self._leader
            self._leader = True
        if not leading:
            me.done.wait()  # stored by a leader, or made the next leader
        if me.outcome is None:
            self._lead(me)
        outcome = me.outcome
        assert outcome is not None
        if isinstance(outcome, StorageError):
            raise outcome
        return outcome

    def _lead(self, me: _Waiting) -> None:
        """Store the files waiting (``me`` first: a leader is always the longest waiting),
        then pass the lead to the first that arrived meanwhile."""
        with self._lock:
            group = self._waiting[: self.max_group]
            del self._waiting[: self.max_group]
        assert group[0] is me
        self._store(group)
        with self._lock:
            if self._waiting:
                self._waiting[0].done.set()  # its outcome is None: it leads next
            else:
                self._leader = False

    def _store(self, group: list[_Waiting]) -> None:
        try:
            outcomes: list[IngestResult | StorageError] = ingest_files(
                self.archive, [waiting.received for waiting in group]
            )
        except Exception as error:  # noqa: BLE001 (every waiting caller must get an answer)
            log.exception("group of %d files failed", len(group))
            failure = StorageUnavailable(f"internal error: {type(error).__name__}")
            outcomes = [failure] * len(group)
        self.files += len(group)
        self.groups += 1
        for waiting, outcome in zip(group, outcomes, strict=True):
            waiting.outcome = outcome
            waiting.done.set()
