"""Group commit of received files: the files stored by concurrent callers (C-STORE
associations) share index transactions (``storage/grouping.py``): one look-up, one
transaction, one commit for each group of files, each caller answered only once its file is
durable and indexed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from storage.archive import Archive
from storage.errors import StorageError, StorageUnavailable
from storage.grouping import Groups
from storage.ingest import IngestResult, Received, ingest_files

log = logging.getLogger(__name__)

# Files per transaction: enough to absorb a burst from many associations, few enough that
# one transaction's rows and files stay small.
MAX_GROUP = 64


class GroupCommit:
    """Stores files for many threads, several per index transaction."""

    def __init__(self, archive: Archive, max_group: int = MAX_GROUP) -> None:
        self.archive = archive
        self._groups: Groups[Received, IngestResult] = Groups(self._store, max_group)

    @property
    def files(self) -> int:
        return self._groups.items

    @property
    def groups(self) -> int:
        return self._groups.groups

    def ingest(self, received: Received) -> IngestResult:
        """Store one file (as :func:`storage.ingest.ingest_file` does); raise its
        :class:`StorageError`."""
        return self._groups.submit(received)

    def _store(self, group: list[Received]) -> Sequence[IngestResult | StorageError]:
        try:
            return ingest_files(self.archive, group)
        except Exception as error:  # noqa: BLE001 (every waiting caller must get an answer)
            log.exception("group of %d files failed", len(group))
            return [StorageUnavailable(f"internal error: {type(error).__name__}")] * len(group)
