"""C-FIND SCP (PS3.4 C.4.1): Patient Root and Study Root, hierarchical queries.

Matches are streamed from a database cursor as pending responses, written in batches
(:mod:`server.dimse.c_find_responses`); a C-CANCEL stops the stream and closes the cursor
(PS3.4 C.4.1.2.3.1), checked before each match.
"""

from __future__ import annotations

import logging
from typing import Any

from config import Settings
from server.dimse.association import Association, Message
from server.dimse.c_find_responses import PendingResponses
from server.dimse.commands import CommandField
from server.dimse.identifier import query_request, request_identifier
from server.dimse.pdu import AssociationEnded
from server.dimse.statuses import (
    CANCEL,
    FIND_ERROR_STATUS,
    SUCCESS,
    UNABLE_TO_PROCESS,
    error_comment,
    status_for,
)
from storage.archive import Archive
from storage.audit import AuditEvent, query_entry, refusal_entry
from storage.errors import StorageError
from storage.query import search

log = logging.getLogger(__name__)


def handle_c_find(
    assoc: Association, message: Message, archive: Archive, settings: Settings
) -> None:
    try:
        request = query_request(
            request_identifier(assoc, message),
            message.context.abstract_syntax,
            case_insensitive_person_names=settings.query.case_insensitive_person_names,
        )
    except StorageError as error:
        archive.record_refusal(
            assoc.context,
            refusal_entry(
                AuditEvent.QUERY,
                error,
                service="C-FIND",
                sop_class_uid=message.context.abstract_syntax,
            ),
        )
        _refuse(assoc, message, error)
        return
    query = request.query
    # Recorded before the first match is sent (PS3.15 A.5.3.10 Query), by the search on its
    # own connection; a record that cannot be written refuses the C-FIND (below).
    entry = query_entry(
        query.level.value,
        query.matching,
        service="C-FIND",
        sop_class_uid=message.context.abstract_syntax,
    )
    # The matching keys at INFO, their values (names, IDs: patient data) at DEBUG only.
    log.info(
        "[%s] C-FIND %s level %s in %s, keys %s",
        assoc.name,
        request.query.model.value,
        request.query.level.value,
        assoc.context.partition,
        ",".join(sorted(key for key, value in request.query.matching.items() if value)) or "-",
    )
    log.debug("[%s] C-FIND matching %s", assoc.name, dict(request.query.matching))
    responses = PendingResponses(
        assoc, message.context, message.message_id, request, settings.dimse.ae_title
    )
    rows = search(archive, request.query, (assoc.context, entry))
    matches = 0
    try:
        while True:
            try:
                row: dict[str, Any] | None = next(rows, None)
            except StorageError as error:
                responses.flush()
                _refuse(assoc, message, error)
                return
            if row is None:
                break
            # PS3.4 C.4.1.2.3.1: on C-CANCEL, stop matching and answer Cancel.
            if assoc.cancel_requested(message.message_id):
                log.info("[%s] C-FIND cancelled after %d matches", assoc.name, matches)
                responses.discard()
                _final(assoc, message, CANCEL)
                return
            matches += 1
            responses.add(row)
        responses.flush()
    except AssociationEnded:
        raise
    except Exception:
        log.exception("[%s] C-FIND failed after %d matches", assoc.name, matches)
        _final(assoc, message, UNABLE_TO_PROCESS, "internal error while matching")
        return
    finally:
        rows.close()
    _final(assoc, message, SUCCESS)
    log.info("[%s] C-FIND complete: %d matches", assoc.name, matches)


def _refuse(assoc: Association, message: Message, error: Exception) -> None:
    status = status_for(error, FIND_ERROR_STATUS)
    log.warning("[%s] C-FIND refused with 0x%04X: %s", assoc.name, status, error)
    _final(assoc, message, status, str(error))


def _final(assoc: Association, message: Message, status: int, comment: str = "") -> None:
    """PS3.7 9.3.2.2: the final C-FIND-RSP, without an Identifier."""
    values: dict[str, Any] = {
        "AffectedSOPClassUID": message.context.abstract_syntax,
        "CommandField": CommandField.C_FIND_RSP,
        "MessageIDBeingRespondedTo": message.message_id,
        "Status": status,
    }
    if comment:
        values["ErrorComment"] = error_comment(comment)
    assoc.send_command(message.context, values)
