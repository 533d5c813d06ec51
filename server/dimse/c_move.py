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
from server.dimse.retrieve import RetrieveRefused, plan_retrieve
from server.dimse.storage_scu import proposed_contexts, sub_operations
from server.dimse.transport import acknowledge_at_once, disable_nagle
from storage.archive import Archive

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
        plan = plan_retrieve(event, archive, "C-MOVE")
    except RetrieveRefused as refusal:
        # pynetdicom accepts a failure only after the destination and a count, and associates
        # with the destination in between: the refusal (PS3.4 C.4.2.1.5: A701, A702, A900) is
        # sent only once that association is established, or answered 0xA801 when it cannot be
        # (docs/conformance.md). Verification only: nothing is sent to the destination.
        contexts = [build_context(Verification)]
        yield (
            destination.host,
            destination.port,
            {"ae_title": destination.ae_title, "contexts": contexts},
        )
        yield 1
        yield refusal.status, None
        return

    log.info("[%s] C-MOVE to %s", assoc.name, destination.ae_title)
    store_associations: list[Association] = []

    def remember(accepted: Event) -> None:
        store_associations.append(accepted.assoc)

    yield (
        destination.host,
        destination.port,
        {
            "ae_title": destination.ae_title,
            "contexts": proposed_contexts(plan.syntaxes),
            "evt_handlers": [
                (evt.EVT_CONN_OPEN, disable_nagle),
                (evt.EVT_DATA_SENT, acknowledge_at_once),
                (evt.EVT_ACCEPTED, remember),
            ],
        },
    )
    yield plan.number_of_sub_operations
    # pynetdicom has associated with the destination (or answered 0xA801 and stopped here).
    spool_dir = settings.server.data_dir / "tmp"
    yield from sub_operations(
        event, archive, plan, store_associations[0], spool_dir, settings.server.transcode_max_bytes
    )
