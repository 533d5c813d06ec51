"""C-MOVE SCP (PS3.4 C.4.2): send the matching instances to a known Move Destination
(stored in the index: ``hilum peers``, seeded from ``[[dimse.peers]]``).

Hilum associates with the destination as Storage SCU (:mod:`server.dimse.negotiation`),
proposing a context for each SOP class and stored transfer syntax of the plan, performs one
C-STORE per instance (:mod:`server.dimse.storage_scu`), and answers the C-MOVE with a pending
response after each and the final one: Success, 0xB000 with the Failed SOP Instance UID List,
or 0xA702 when every sub-operation failed.
"""

from __future__ import annotations

import logging

from config import Settings
from server.dimse.association import Association, Message
from server.dimse.commands import CommandField
from server.dimse.negotiation import AssociationRefused, request_association
from server.dimse.pdu import PeerGone
from server.dimse.retrieve import (
    RetrieveRefused,
    RetrieveResponses,
    perform_sub_operations,
    plan_retrieve,
)
from server.dimse.statuses import MOVE_DESTINATION_UNKNOWN, UNABLE_TO_CALCULATE_NUMBER_OF_MATCHES
from server.dimse.storage_scu import proposed_contexts
from server.dimse.tls import client_context
from storage.archive import Archive
from storage.audit import AuditEvent, refusal_entry
from storage.errors import StorageError
from storage.move_destinations import find_move_destination

log = logging.getLogger(__name__)


def handle_c_move(
    assoc: Association, message: Message, archive: Archive, settings: Settings
) -> None:
    responses = RetrieveResponses(assoc, message, CommandField.C_MOVE_RSP)
    title = str(message.command.get("MoveDestination", ""))
    try:
        destination = find_move_destination(archive.index, title)
    except StorageError as error:
        # PS3.4 C.4.2.1.5: A701, the index cannot be read.
        responses.refuse(UNABLE_TO_CALCULATE_NUMBER_OF_MATCHES, str(error))
        return
    if destination is None:
        # PS3.4 C.4.2.1.5: 0xA801, Move Destination unknown (hilum peers).
        log.warning("[%s] C-MOVE to unknown destination %r", assoc.name, title)
        archive.record_refusal(
            assoc.context,
            refusal_entry(
                AuditEvent.RETRIEVE,
                LookupError(f"unknown Move Destination {title}"),
                service="C-MOVE",
                move_destination=title,
            ),
        )
        responses.refuse(MOVE_DESTINATION_UNKNOWN, f"unknown Move Destination {title}")
        return
    dimse = settings.dimse
    if destination.tls and not (dimse.tls_certificate and dimse.tls_private_key):
        log.warning("[%s] C-MOVE to %s needs DICOM TLS, not configured", assoc.name, title)
        responses.refuse(MOVE_DESTINATION_UNKNOWN, "TLS peer: no [dimse] tls_certificate")
        return
    try:
        plan = plan_retrieve(assoc, message, archive, "C-MOVE", move_destination=title)
    except RetrieveRefused as refusal:
        # PS3.4 C.4.2.1.5: A701, A702, A900, answered before any association to the destination.
        responses.refuse(refusal.status, refusal.comment)
        return

    if not plan.instances:
        responses.final()  # nothing to send: no association to the destination
        return
    log.info("[%s] C-MOVE to %s", assoc.name, destination.ae_title)
    try:
        store_assoc = request_association(
            destination.host,
            destination.port,
            calling_ae_title=settings.dimse.ae_title,
            called_ae_title=destination.ae_title,
            contexts=proposed_contexts(plan.syntaxes),
            max_pdu_length=settings.dimse.max_pdu_length,
            timeout=settings.dimse.network_timeout_s,
            tls=client_context(settings.dimse) if destination.tls else None,
        )
    except (AssociationRefused, PeerGone) as error:
        log.warning("[%s] C-MOVE destination %s: %s", assoc.name, destination.ae_title, error)
        responses.refuse(MOVE_DESTINATION_UNKNOWN, f"{destination.ae_title}: {error}")
        return
    try:
        perform_sub_operations(assoc, message, plan, store_assoc, archive, settings, "C-MOVE")
    finally:
        store_assoc.release(timeout=settings.dimse.network_timeout_s)
