"""What C-MOVE and C-GET share: the request, the list of instances to send, and the refusal.

The plan reads the matching instances once, before the first sub-operation (PS3.4 C.4.2.1.4:
the number of sub-operations comes first), and the sub-operations send exactly that list: an
instance ingested meanwhile is not sent, one deleted meanwhile is a failed sub-operation, and
no read transaction stays open while the peer receives.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom.events import Event

from server.dimse.identifier import request_identifier, retrieve_request
from server.dimse.statuses import (
    RETRIEVE_ERROR_STATUS,
    UNABLE_TO_PERFORM_SUB_OPERATIONS,
    status_dataset,
    status_for,
)
from storage.archive import Archive
from storage.errors import StorageError
from storage.query import Query, StoredInstance, locate_instances

log = logging.getLogger(__name__)

# PS3.7 C.4.2.1 / C.4.3.1: the Number of ... Sub-operations are US, so one retrieve sends at
# most 65535 instances (pynetdicom refuses more). A StoredInstance without metadata or frame
# ranges is about 1 KB, so a plan holds at most some 60 MB.
MAX_SUB_OPERATIONS = 65535


@dataclass
class RetrievePlan:
    """What a C-MOVE or C-GET will send: the instances, counted before the first sub-operation."""

    query: Query
    instances: list[StoredInstance]
    # (SOP Class UID, stored Transfer Syntax UID) pairs among the instances.
    syntaxes: set[tuple[str, str]] = field(default_factory=set)

    @property
    def number_of_sub_operations(self) -> int:
        return len(self.instances)


class RetrieveRefused(Exception):
    """The request cannot be served; ``status`` is the final response to send."""

    def __init__(self, status: Dataset) -> None:
        super().__init__(status.get("ErrorComment", ""))
        self.status = status


def plan_retrieve(event: Event, archive: Archive, service: str) -> RetrievePlan:
    """The plan for a C-MOVE or C-GET request; raise :class:`RetrieveRefused` (logged)."""
    assoc = event.assoc
    try:
        query = retrieve_request(request_identifier(event), str(event.request.AffectedSOPClassUID))
        located = locate_instances(archive, query)
        try:
            instances = list(itertools.islice(located, MAX_SUB_OPERATIONS + 1))
        finally:
            located.close()
    except StorageError as error:
        # PS3.4 C.4.2.1.5, C.4.3.1.4: 0xA701 (index unavailable), 0xA900 (bad Identifier).
        status = status_for(error, RETRIEVE_ERROR_STATUS)
        log.warning("[%s] %s refused with 0x%04X: %s", assoc.name, service, status, error)
        raise RetrieveRefused(status_dataset(status, str(error))) from error
    if len(instances) > MAX_SUB_OPERATIONS:
        comment = f"over {MAX_SUB_OPERATIONS} instances: retrieve series by series"
        log.warning("[%s] %s refused: %s", assoc.name, service, comment)
        raise RetrieveRefused(status_dataset(UNABLE_TO_PERFORM_SUB_OPERATIONS, comment))
    plan = RetrievePlan(query, instances)
    plan.syntaxes = {(i.sop_class_uid, i.transfer_syntax_uid) for i in instances}
    log.info(
        "[%s] %s %s level %s: %d instances",
        assoc.name,
        service,
        query.model.value,
        query.level.value,
        plan.number_of_sub_operations,
    )
    return plan
