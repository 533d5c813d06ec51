"""Association negotiation (PS3.8 7.1, 9.3.2-9.3.4; PS3.7 Annex D.3.3), both sides.

pynetdicom serves as a codec only: its PDU classes decode and encode the A-ASSOCIATE PDUs, and
:func:`pynetdicom.presentation.negotiate_as_acceptor` picks the transfer syntax and the roles of
each proposed presentation context. The policy (who may associate, how many at once) and every
byte read or written are Hilum's.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAcceptPdu
from pynetdicom.pdu import A_ASSOCIATE_RJ as AssociateRejectPdu
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRequestPdu
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

from server.dimse.association import Association, Context, configure_socket
from server.dimse.pdu import (
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    AbortReason,
    PduSocket,
    PeerGone,
    ProtocolError,
)

log = logging.getLogger(__name__)

# PS3.7 A.2.1: the DICOM Application Context Name.
APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
# PS3.7 D.3.3.2: Hilum's Implementation Class UID (a UUID-derived UID, PS3.5 B.2) and name.
IMPLEMENTATION_CLASS_UID = "2.25.243419138995183294436733578990032523866"
IMPLEMENTATION_VERSION_NAME = "HILUM_010"


@dataclass(frozen=True)
class Rejection:
    """PS3.8 9.3.4, Table 9-21: result (1 permanent, 2 transient), source and reason."""

    result: int
    source: int
    reason: int
    why: str


# PS3.8 Table 9-21.
CALLING_AE_NOT_RECOGNIZED = (1, 1, 3)
CALLED_AE_NOT_RECOGNIZED = (1, 1, 7)
NO_REASON = (1, 1, 1)
NO_REASON_TRANSIENT = (2, 1, 1)  # the index could not be read: try again later
LOCAL_LIMIT_EXCEEDED = (2, 3, 2)


@dataclass(frozen=True)
class AssociationRequest:
    """What the peer proposed, decoded."""

    calling_ae_title: str
    called_ae_title: str
    primitive: A_ASSOCIATE

    @property
    def max_pdu_length(self) -> int:
        return int(self.primitive.maximum_length_received or 0)


def supported_context(
    abstract_syntax: str, transfer_syntaxes: list[str], *, scu_role: bool | None = None
) -> PresentationContext:
    """A context this acceptor supports; ``scu_role``: accept SCP/SCU Role Selection
    (PS3.7 D.3.3.4) so that a C-GET SCU may have Hilum send C-STOREs on it."""
    context = build_context(abstract_syntax, transfer_syntaxes)
    if scu_role is not None:
        context.scu_role = scu_role
        context.scp_role = True
    return context


def receivers_preference(
    proposed: list[PresentationContext],
    supported: list[PresentationContext],
    roles: Mapping[UID, tuple[bool | None, bool | None]],
) -> list[PresentationContext]:
    """``supported``, where the requestor takes the SCP role for a SOP class (PS3.7 D.3.3.4: a
    C-GET SCU that receives the instances), with the transfer syntaxes it proposed first, in
    its order: the receiver's preference decides, as a Move Destination chooses among those
    Hilum proposes. pynetdicom accepts the first of the acceptor's syntaxes that was proposed,
    and Hilum's list starts with implicit VR: an SCU that proposes explicit VR first (DCMTK's
    getscu) had every instance stored in explicit VR re-encoded, in a decoder process, instead
    of its stored bytes sent as they are. Contexts Hilum receives on keep Hilum's order."""
    receiving = {str(uid) for uid, (_scu, scp) in roles.items() if scp}
    if not receiving:
        return supported
    order: dict[str, list[str]] = {}
    for context in proposed:
        if str(context.abstract_syntax) in receiving:
            theirs = order.setdefault(str(context.abstract_syntax), [])
            theirs += [str(s) for s in context.transfer_syntax if str(s) not in theirs]
    preferred = []
    for context in supported:
        theirs = order.get(str(context.abstract_syntax), [])
        if theirs:
            ours = [str(s) for s in context.transfer_syntax]
            first = [s for s in theirs if s in ours]
            context = _with_syntaxes(context, first + [s for s in ours if s not in first])
        preferred.append(context)
    return preferred


def _with_syntaxes(context: PresentationContext, syntaxes: list[str]) -> PresentationContext:
    """A copy of a supported ``context`` with ``syntaxes`` in that order (the supported list is
    shared by every association: not changed)."""
    copy = build_context(str(context.abstract_syntax), syntaxes)
    copy.scu_role, copy.scp_role = context.scu_role, context.scp_role
    return copy


def read_association_request(wire: PduSocket, timeout: float) -> AssociationRequest:
    """The first PDU of an accepted connection, which must be an A-ASSOCIATE-RQ."""
    pdu_type, length = wire.read_pdu_header(idle_timeout=timeout)
    body = wire.read_body(length)
    if pdu_type != A_ASSOCIATE_RQ:
        raise ProtocolError(
            f"PDU type 0x{pdu_type:02X} before an association", AbortReason.UNEXPECTED_PDU
        )
    pdu = AssociateRequestPdu()
    try:
        pdu.decode(bytes([pdu_type, 0]) + length.to_bytes(4, "big") + body)
        primitive = pdu.to_primitive()
    except Exception as error:  # noqa: BLE001 (the codec raises many kinds on bad bytes)
        raise ProtocolError(
            f"malformed A-ASSOCIATE-RQ: {error}", AbortReason.INVALID_PDU_PARAMETER_VALUE
        ) from error
    return AssociationRequest(
        str(primitive.calling_ae_title).strip(), str(primitive.called_ae_title).strip(), primitive
    )


def reject(wire: PduSocket, request: AssociationRequest, rejection: Rejection) -> None:
    primitive = A_ASSOCIATE()
    primitive.result, primitive.result_source, primitive.diagnostic = (
        rejection.result,
        rejection.source,
        rejection.reason,
    )
    pdu = AssociateRejectPdu()
    pdu.from_primitive(primitive)
    wire.send(pdu.encode())


def accept(
    wire: PduSocket,
    request: AssociationRequest,
    supported: list[PresentationContext],
    *,
    max_pdu_length: int,
    peer_address: str,
) -> Association:
    """Negotiate the presentation contexts and roles, send the A-ASSOCIATE-AC."""
    rq = request.primitive
    roles = {
        item.sop_class_uid: (item.scu_role, item.scp_role)
        for item in rq.user_information
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
    }
    proposed = rq.presentation_context_definition_list
    results, role_replies = negotiate_as_acceptor(
        proposed, receivers_preference(proposed, supported, roles), roles or None
    )
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    primitive.calling_ae_title = rq.calling_ae_title
    primitive.called_ae_title = rq.called_ae_title
    primitive.result, primitive.result_source = 0x00, 0x01
    primitive.presentation_context_definition_results_list = results
    primitive.user_information = _user_information(max_pdu_length)
    primitive.user_information.extend(role_replies)
    if any(isinstance(i, AsynchronousOperationsWindowNegotiation) for i in rq.user_information):
        # PS3.7 D.3.3.3: Hilum performs one operation at a time, either way.
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        primitive.user_information.append(window)
    pdu = AssociateAcceptPdu()
    pdu.from_primitive(primitive)
    wire.send(pdu.encode())
    contexts = [
        Context(
            int(c.context_id),
            str(c.abstract_syntax),
            str(c.transfer_syntax[0]),
            as_scu=bool(c.as_scu),
            as_scp=bool(c.as_scp),
        )
        for c in results
        if c.result == 0x00 and c.context_id is not None
    ]
    return Association(
        wire,
        contexts,
        calling_ae_title=request.calling_ae_title,
        called_ae_title=request.called_ae_title,
        peer_address=peer_address,
        max_pdu_receive=max_pdu_length,
        max_pdu_send=request.max_pdu_length,
    )


def _user_information(max_pdu_length: int) -> list:
    """PS3.7 D.3.3.1, D.3.3.2: Maximum Length Received and the implementation's identity."""
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu_length
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [max_length, class_uid, version]


class AssociationRefused(Exception):
    """The peer rejected the association, or did not answer as an acceptor."""


def request_association(
    host: str,
    port: int,
    *,
    calling_ae_title: str,
    called_ae_title: str,
    contexts: Iterable[tuple[str, list[str]]],
    max_pdu_length: int,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> Association:
    """Associate with a peer as requestor (PS3.8 7.1): the contexts proposed are
    (abstract syntax, transfer syntaxes) pairs, given odd context IDs in order (PS3.8 9.3.2.2).
    Raise AssociationRefused (or PeerGone when it cannot be reached)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        configure_socket(sock)
        if tls is not None:
            sock = tls.wrap_socket(sock)
    except OSError as error:  # ssl.SSLError included
        raise PeerGone(f"cannot connect to {host}:{port}: {error}") from error
    wire = PduSocket(sock, idle_timeout=timeout, pdu_timeout=timeout)
    proposed = []
    for n, (abstract_syntax, syntaxes) in enumerate(contexts):
        context = build_context(abstract_syntax, syntaxes)
        context.context_id = 2 * n + 1
        proposed.append(context)
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    primitive.calling_ae_title = calling_ae_title
    primitive.called_ae_title = called_ae_title
    primitive.presentation_context_definition_list = proposed
    primitive.user_information = _user_information(max_pdu_length)
    request = AssociateRequestPdu()
    request.from_primitive(primitive)
    try:
        wire.send(request.encode())
        pdu_type, length = wire.read_pdu_header()
        body = wire.read_body(length)
        if pdu_type == A_ASSOCIATE_RJ:
            raise AssociationRefused(f"{called_ae_title} rejected the association")
        if pdu_type != A_ASSOCIATE_AC:
            raise AssociationRefused(f"{called_ae_title} answered PDU type 0x{pdu_type:02X}")
        answer = AssociateAcceptPdu()
        answer.decode(bytes([pdu_type, 0]) + length.to_bytes(4, "big") + body)
        accepted = answer.to_primitive()
    except (AssociationRefused, PeerGone, ProtocolError):
        wire.close()
        raise
    except Exception as error:  # noqa: BLE001 (the codec raises many kinds on bad bytes)
        wire.close()
        raise AssociationRefused(f"malformed A-ASSOCIATE-AC: {error}") from error
    by_id = {c.context_id: c for c in proposed}
    negotiated = [
        Context(
            int(c.context_id),
            str(by_id[c.context_id].abstract_syntax),
            str(c.transfer_syntax[0]),
            as_scu=True,
            as_scp=False,
        )
        for c in accepted.presentation_context_definition_results_list
        if c.result == 0x00
        and c.context_id is not None
        and c.context_id in by_id
        and c.transfer_syntax
    ]
    return Association(
        wire,
        negotiated,
        calling_ae_title=calling_ae_title,
        called_ae_title=called_ae_title,
        peer_address=f"{host}:{port}",
        max_pdu_receive=max_pdu_length,
        max_pdu_send=int(accepted.maximum_length_received or 0),
    )
