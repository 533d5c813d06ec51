"""C-MOVE SCP (PS3.4 C.4.2): send the matching instances to a known Move Destination.

pynetdicom drives the protocol: the handler yields the destination's address, then the number
of sub-operations, then one (Pending, data set) per instance; pynetdicom opens the association
to the destination, performs each C-STORE, counts completed/failed/warning sub-operations in
its pending responses and ends with Success, 0xB000 with the Failed SOP Instance UID List, or
0xA702 when every sub-operation failed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from config import Settings
from server.dimse.identifier import query_request, request_identifier
from server.dimse.statuses import RETRIEVE_ERROR_STATUS, status_dataset, status_for
from server.dimse.storage_scu import plan_retrieve, proposed_contexts, sub_operations
from server.dimse.transport import disable_nagle
from storage.archive import Archive
from storage.errors import StorageError

log = logging.getLogger(__name__)


def handle_c_move(event: Event, archive: Archive, settings: Settings) -> Iterator[Any]:
    assoc = event.assoc
    destination = settings.dimse.peer(event.move_destination or "")
    if destination is None:
        # PS3.4 C.4.2.1.5: 0xA801, Move Destination unknown.
        log.warning("[%s] C-MOVE to unknown destination %r", assoc.name, event.move_destination)
        yield None, None
        return

    try:
        request = query_request(
            request_identifier(event),
            str(event.request.AffectedSOPClassUID),
            case_insensitive_person_names=settings.query.case_insensitive_person_names,
        )
        plan = plan_retrieve(archive, request.query)
    except StorageError as error:
        # pynetdicom accepts a failure only after the destination and a count, so the refusal
        # goes out as the first "result" (PS3.4 C.4.2.1.5 statuses A701, A900).
        status = status_for(error, RETRIEVE_ERROR_STATUS)
        log.warning("[%s] C-MOVE refused with 0x%04X: %s", assoc.name, status, error)
        # Verification only: pynetdicom needs one context to associate; nothing is sent.
        contexts = [build_context(Verification)]
        yield (
            destination.host,
            destination.port,
            {"ae_title": destination.ae_title, "contexts": contexts},
        )
        yield 1
        yield status_dataset(status, str(error)), None
        return

    log.info(
        "[%s] C-MOVE %s level %s to %s: %d instances",
        assoc.name,
        request.query.model.value,
        request.query.level.value,
        destination.ae_title,
        plan.number_of_sub_operations,
    )
    store_associations: list[Association] = []

    def remember(accepted: Event) -> None:
        store_associations.append(accepted.assoc)

    yield (
        destination.host,
        destination.port,
        {
            "ae_title": destination.ae_title,
            "contexts": proposed_contexts(plan.syntaxes),
            "evt_handlers": [(evt.EVT_CONN_OPEN, disable_nagle), (evt.EVT_ACCEPTED, remember)],
        },
    )
    yield plan.number_of_sub_operations
    # pynetdicom has associated with the destination (or answered 0xA801 and stopped here).
    yield from sub_operations(event, archive, request.query, store_associations[0])
