"""What C-MOVE and C-GET share: the request, the list of instances to send, the sub-operations
and their responses (PS3.4 C.4.2, C.4.3).

The plan reads the matching instances once, before the first sub-operation (PS3.4 C.4.2.1.4:
the number of sub-operations comes first), and the sub-operations send exactly that list: an
instance ingested meanwhile is not sent, one deleted meanwhile is a failed sub-operation, and
no read transaction stays open while the peer receives.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

from config import Settings
from server.dimse.association import Association, Message
from server.dimse.commands import CommandField
from server.dimse.identifier import request_identifier, retrieve_request
from server.dimse.pdu import AssociationEnded
from server.dimse.statuses import (
    CANCEL,
    PENDING,
    RETRIEVE_ERROR_STATUS,
    SUB_OPERATIONS_COMPLETE_WITH_FAILURES,
    SUCCESS,
    UNABLE_TO_PERFORM_SUB_OPERATIONS,
    error_comment,
    status_for,
)
from server.dimse.storage_scu import (
    OutgoingStore,
    SubOperationCancelled,
    SubOperationFailed,
    await_store_response,
    prepare_store,
    send_store,
)
from storage.archive import Archive
from storage.audit import AuditEvent, refusal_entry, retrieve_entries, studies_of
from storage.errors import StorageError
from storage.query import Query, StoredInstance, locate_instances

log = logging.getLogger(__name__)

# PS3.7 C.4.2.1 / C.4.3.1: the Number of ... Sub-operations are US, so one retrieve sends at
# most 65535 instances. A StoredInstance without metadata or frame ranges is about 1 KB, so a
# plan holds at most some 60 MB.
MAX_SUB_OPERATIONS = 65535
# PS3.4 B.2.3: C-STORE statuses that are warnings (coercion, elements discarded, not checked).
STORE_WARNINGS = frozenset({0x0001, 0xB000, 0xB006, 0xB007})


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
    """The request cannot be served: ``status`` and ``comment`` make the final response."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


def plan_retrieve(
    assoc: Association, message: Message, archive: Archive, service: str, **audited: str
) -> RetrievePlan:
    """The plan for a C-MOVE or C-GET request; raise :class:`RetrieveRefused` (logged).
    ``audited``: more for the audit record (the Move Destination)."""
    try:
        query = retrieve_request(
            request_identifier(assoc, message), message.context.abstract_syntax
        )
        located = locate_instances(archive, query)
        try:
            instances = list(itertools.islice(located, MAX_SUB_OPERATIONS + 1))
        finally:
            located.close()
    except StorageError as error:
        # PS3.4 C.4.2.1.5, C.4.3.1.4: 0xA701 (index unavailable), 0xA900 (bad Identifier).
        archive.record_refusal(
            assoc.context, refusal_entry(AuditEvent.RETRIEVE, error, service=service, **audited)
        )
        status = status_for(error, RETRIEVE_ERROR_STATUS)
        log.warning("[%s] %s refused with 0x%04X: %s", assoc.name, service, status, error)
        raise RetrieveRefused(status, str(error)) from error
    if len(instances) > MAX_SUB_OPERATIONS:
        comment = f"over {MAX_SUB_OPERATIONS} instances: retrieve series by series"
        log.warning("[%s] %s refused: %s", assoc.name, service, comment)
        raise RetrieveRefused(UNABLE_TO_PERFORM_SUB_OPERATIONS, comment)
    try:
        # Recorded before the first sub-operation (PS3.15 A.5.3.7, Hilum the source).
        archive.record(
            assoc.context,
            *retrieve_entries(studies_of(instances), service=service, **audited),
        )
    except StorageError as error:
        status = status_for(error, RETRIEVE_ERROR_STATUS)
        log.warning("[%s] %s refused with 0x%04X: %s", assoc.name, service, status, error)
        raise RetrieveRefused(status, str(error)) from error
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


class RetrieveResponses:
    """The responses of one C-MOVE or C-GET request: pending after each sub-operation, then the
    final one with the counts and the Failed SOP Instance UID List (PS3.4 C.4.2.1.5)."""

    def __init__(self, assoc: Association, message: Message, response_field: int) -> None:
        self.assoc = assoc
        self.message = message
        self.response_field = response_field
        self.completed = self.failed = self.warning = 0
        self.failed_uids: list[str] = []

    def sub_operation(self, instance: StoredInstance, status: int | None, remaining: int) -> None:
        """Count one sub-operation (``status`` None: it could not be sent) and report it."""
        if status == SUCCESS:
            self.completed += 1
            outcome = "completed"
        elif status in STORE_WARNINGS:
            self.warning += 1
            outcome = "warning"
        else:
            self.failed += 1
            self.failed_uids.append(instance.sop_instance_uid)
            outcome = "failed"
        counted = self.assoc.stats.sub_operations
        counted[outcome] = counted.get(outcome, 0) + 1
        self.send(PENDING, remaining=remaining)

    def final(self, *, cancelled_with: int | None = None) -> None:
        if cancelled_with is not None:
            self.send(CANCEL, remaining=cancelled_with, failed_list=True)
        elif self.failed and not (self.completed or self.warning):
            self.send(UNABLE_TO_PERFORM_SUB_OPERATIONS, failed_list=True)
        elif self.failed or self.warning:
            self.send(SUB_OPERATIONS_COMPLETE_WITH_FAILURES, failed_list=True)
        else:
            self.send(SUCCESS)

    def refuse(self, status: int, comment: str) -> None:
        self.send(status, comment=comment, counts=False)

    def send(
        self,
        status: int,
        *,
        remaining: int | None = None,
        failed_list: bool = False,
        comment: str = "",
        counts: bool = True,
    ) -> None:
        values: dict[str, Any] = {
            "AffectedSOPClassUID": self.message.context.abstract_syntax,
            "CommandField": self.response_field,
            "MessageIDBeingRespondedTo": self.message.message_id,
            "Status": status,
            "NumberOfRemainingSuboperations": remaining,
        }
        if counts:
            values["NumberOfCompletedSuboperations"] = self.completed
            values["NumberOfFailedSuboperations"] = self.failed
            values["NumberOfWarningSuboperations"] = self.warning
        if comment:
            values["ErrorComment"] = error_comment(comment)
        data_set = None
        if failed_list and self.failed_uids:
            # PS3.4 C.4.2.1.4.2: the Identifier of the final response lists the failed UIDs.
            identifier = Dataset()
            identifier.FailedSOPInstanceUIDList = self.failed_uids
            data_set = self.assoc.encode_data_set(self.message.context, identifier)
        self.assoc.send_command(self.message.context, values, data_set)


def perform_sub_operations(
    assoc: Association,
    message: Message,
    plan: RetrievePlan,
    store_assoc: Association,
    archive: Archive,
    settings: Settings,
    service: str,
) -> None:
    """Send every instance of the plan on ``store_assoc``, answering ``message`` with a pending
    response after each and the final one at the end; a C-CANCEL stops the sub-operations
    (PS3.4 C.4.2.3.1, C.4.3.3.1).

    The next sub-operation is made ready (its stored file opened, or the instance transcoded)
    while the peer receives and answers the one sent: with one operation outstanding at a time
    (neither side negotiates an asynchronous operations window, PS3.7 D.3.3.3) that work then
    costs no time between the peer's C-STORE-RSP and the next C-STORE-RQ. A file made ready
    and not sent (cancel, destination lost, error) is closed."""
    response_field = CommandField.C_MOVE_RSP if service == "C-MOVE" else CommandField.C_GET_RSP
    responses = RetrieveResponses(assoc, message, response_field)
    on_same_association = store_assoc is assoc
    originator = None if on_same_association else (assoc.calling_ae_title, message.message_id)
    peer_title = assoc.calling_ae_title if on_same_association else store_assoc.called_ae_title
    total = plan.number_of_sub_operations

    def ready(n: int) -> OutgoingStore | Exception | None:
        """Sub-operation ``n`` made ready, or why it cannot be sent; None past the last."""
        if n >= total:
            return None
        try:
            return prepare_store(
                store_assoc,
                archive,
                plan.instances[n],
                settings.server.transcode_max_bytes,
                move_originator=originator,
            )
        except (SubOperationFailed, StorageError, OSError) as error:
            return error

    outgoing: OutgoingStore | Exception | None = None
    following = ready(0)
    try:
        for n, instance in enumerate(plan.instances):
            outgoing, following = following, None
            if assoc.cancel_requested(message.message_id):
                log.info("[%s] %s cancelled by the SCU", assoc.name, service)
                responses.final(cancelled_with=total - n)
                return
            status: int | None = None
            try:
                if not isinstance(outgoing, OutgoingStore):
                    assert outgoing is not None  # n < total
                    raise outgoing
                send_store(store_assoc, outgoing)
                following = ready(n + 1)  # while the peer receives and answers
                status = await_store_response(
                    store_assoc,
                    outgoing.message_id,
                    message.message_id if on_same_association else None,
                )
            except SubOperationCancelled as cancelled:
                responses.sub_operation(instance, cancelled.status, total - n - 1)
                log.info("[%s] %s cancelled by the SCU", assoc.name, service)
                responses.final(cancelled_with=total - n - 1)
                return
            except AssociationEnded as error:
                if on_same_association:
                    raise
                # The destination went away: this and every later sub-operation fail.
                log.warning(
                    "[%s] %s: association to %s lost: %s", assoc.name, service, peer_title, error
                )
                for lost in plan.instances[n:]:
                    responses.failed += 1
                    responses.failed_uids.append(lost.sop_instance_uid)
                responses.final()
                return
            except (SubOperationFailed, StorageError, OSError) as error:
                log.warning(
                    "[%s] C-STORE sub-operation for %s to %s failed: %s",
                    assoc.name,
                    instance.sop_instance_uid,
                    peer_title,
                    error,
                )
            responses.sub_operation(instance, status, total - n - 1)
            if following is None:
                following = ready(n + 1)
        responses.final()
    finally:
        for unsent in (outgoing, following):
            if isinstance(unsent, OutgoingStore):
                unsent.close()
