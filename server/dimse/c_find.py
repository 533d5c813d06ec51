"""C-FIND SCP (PS3.4 C.4.1): Patient Root and Study Root, hierarchical queries.

Matches are streamed from a database cursor as pending responses, written in batches straight
to the association's socket (:mod:`server.dimse.c_find_responses`); a C-CANCEL stops the stream
and closes the cursor (PS3.4 C.4.1.2.3.1). The final response, and every pending response of a
context :mod:`server.dimse.c_find_responses` does not serve (big endian, deflate), go through
pynetdicom, one message each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.events import Event

from config import Settings
from server.dimse.c_find_responses import ConnectionLost, PendingResponses, pending_responses
from server.dimse.identifier import query_request, request_identifier, response_identifier
from server.dimse.statuses import (
    CANCEL,
    FIND_ERROR_STATUS,
    PENDING,
    UNABLE_TO_PROCESS,
    status_dataset,
    status_for,
)
from server.dimse.transport import keep_alive
from storage.archive import Archive
from storage.errors import StorageError
from storage.query import search

log = logging.getLogger(__name__)

# pynetdicom queues outgoing PDUs without bound; past this many unsent messages the handler
# waits for the peer to read, so a slow SCU cannot make the SCP hold the whole result in memory
# (pynetdicom's one-message-per-match path only).
MAX_QUEUED_RESPONSES = 32


def handle_c_find(
    event: Event, archive: Archive, settings: Settings
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    assoc = event.assoc
    try:
        request = query_request(
            request_identifier(event),
            str(event.request.AffectedSOPClassUID),
            case_insensitive_person_names=settings.query.case_insensitive_person_names,
        )
    except StorageError as error:
        yield _refusal(event, error), None
        return

    log.info(
        "[%s] C-FIND %s level %s: %s",
        assoc.name,
        request.query.model.value,
        request.query.level.value,
        dict(request.query.matching),
    )
    batched: PendingResponses | None = pending_responses(event, request, settings.dimse.ae_title)
    rows = search(archive, request.query)
    matches = 0
    try:
        while True:
            try:
                row: dict[str, Any] | None = next(rows, None)
            except StorageError as error:
                _flush(batched)
                yield _refusal(event, error), None
                return
            if row is None:
                break
            # PS3.4 C.4.1.2.3.1: on C-CANCEL, stop matching and answer Cancel.
            if event.is_cancelled:
                log.info("[%s] C-FIND cancelled after %d matches", assoc.name, matches)
                if batched is not None:
                    batched.discard()
                yield CANCEL, None
                return
            matches += 1
            if batched is not None:
                batched.add(row)
                continue
            _wait_for_peer(event)
            yield PENDING, response_identifier(request, row, settings.dimse.ae_title)
        _flush(batched)
    except ConnectionLost as error:
        # pynetdicom's DUL sees the closed connection too and ends the association.
        log.warning("[%s] C-FIND stopped after %d matches: %s", assoc.name, matches, error)
        return
    except Exception:
        log.exception("[%s] C-FIND failed after %d matches", assoc.name, matches)
        yield status_dataset(UNABLE_TO_PROCESS, "internal error while matching"), None
        return
    finally:
        rows.close()
    log.info("[%s] C-FIND complete: %d matches", assoc.name, matches)


def _refusal(event: Event, error: Exception) -> Dataset:
    status = status_for(error, FIND_ERROR_STATUS)
    log.warning("[%s] C-FIND refused with 0x%04X: %s", event.assoc.name, status, error)
    return status_dataset(status, str(error))


def _flush(batched: PendingResponses | None) -> None:
    if batched is not None:
        batched.flush()


def _wait_for_peer(event: Event) -> None:
    """Back-pressure on pynetdicom's path (a batch blocks in sendall instead): hold the next
    response while the peer has not read the earlier ones."""
    assoc = event.assoc
    queue = assoc.dul.to_provider_queue
    while queue.qsize() > MAX_QUEUED_RESPONSES and assoc.is_established:
        time.sleep(0.005)
    keep_alive(assoc)
