"""C-GET SCP (PS3.4 C.4.3): send the matching instances back over the same association.

The SCU proposes storage presentation contexts with SCP/SCU Role Selection (PS3.7 D.3.3.4) so
that Hilum may act as Storage SCU on them; :mod:`server.dimse.ae` accepts that role. pynetdicom
performs each C-STORE sub-operation and counts them in the pending responses, as for C-MOVE.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pynetdicom.events import Event

from config import Settings
from server.dimse.identifier import query_request, request_identifier
from server.dimse.statuses import RETRIEVE_ERROR_STATUS, status_dataset, status_for
from server.dimse.storage_scu import plan_retrieve, sub_operations
from storage.archive import Archive
from storage.errors import StorageError

log = logging.getLogger(__name__)


def handle_c_get(event: Event, archive: Archive, settings: Settings) -> Iterator[Any]:
    assoc = event.assoc
    try:
        request = query_request(
            request_identifier(event),
            str(event.request.AffectedSOPClassUID),
            case_insensitive_person_names=settings.query.case_insensitive_person_names,
        )
        plan = plan_retrieve(archive, request.query)
    except StorageError as error:
        # pynetdicom accepts a failure only after a count (PS3.4 C.4.3.1.4: A701, A900).
        status = status_for(error, RETRIEVE_ERROR_STATUS)
        log.warning("[%s] C-GET refused with 0x%04X: %s", assoc.name, status, error)
        yield 1
        yield status_dataset(status, str(error)), None
        return

    log.info(
        "[%s] C-GET %s level %s: %d instances",
        assoc.name,
        request.query.model.value,
        request.query.level.value,
        plan.number_of_sub_operations,
    )
    yield plan.number_of_sub_operations
    yield from sub_operations(event, archive, request.query, None)
