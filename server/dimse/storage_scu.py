"""The C-STORE sub-operations of C-MOVE and C-GET (PS3.4 C.4.2.3, C.4.3.3): Hilum as Storage SCU.

When the peer accepted the stored transfer syntax, the stored file's data set goes from the blob
stream to the socket as it is, in PDUs of the peer's maximum length: only the File Meta
Information is read (to find where the data set starts) and only the command set is built.
Otherwise the instance is read into memory and transcoded to an uncompressed syntax the peer
accepted (explicit VR little endian preferred), its pixel data decoded in a decoder process
under ``[limits]`` (:mod:`server.transcoding`); an instance larger than ``[server]
transcode_max_bytes`` is not transcoded. When neither works the sub-operation fails, with the
reason logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from server.dimse.association import Association, Context, Message
from server.dimse.commands import PRIORITY_MEDIUM, CommandField
from server.dimse.pdu import AbortReason, ProtocolError
from server.transcoding import TranscodingRefused, transcoded_instance
from storage.archive import Archive
from storage.blobs import BlobStream
from storage.data_set_structure import skip_file_meta
from storage.query import StoredInstance

log = logging.getLogger(__name__)

# Uncompressed little endian syntaxes: a data set in one is re-encoded in the other.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255, so at most 128 contexts.
MAX_PRESENTATION_CONTEXTS = 128
# PS3.10 7.1: 128-byte preamble, "DICM", then File Meta Information elements in explicit VR.


class SubOperationFailed(Exception):
    """This instance cannot be sent to this peer; the message says why."""


class SubOperationCancelled(Exception):
    """The SCU sent C-CANCEL while a C-GET sub-operation was under way (PS3.4 C.4.3.3.1);
    ``status`` is the peer's answer to that sub-operation."""

    def __init__(self, status: int) -> None:
        super().__init__(f"cancelled (the sub-operation answered 0x{status:04X})")
        self.status = status


def proposed_contexts(syntaxes: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """The contexts Hilum proposes to a Move Destination: for each SOP class, one with each
    stored compressed syntax (sent as stored when accepted) and one uncompressed fallback."""
    by_class: dict[str, set[str]] = {}
    for sop_class, syntax in syntaxes:
        by_class.setdefault(sop_class, set()).add(syntax)
    fallbacks = [(sop_class, [str(s) for s in UNCOMPRESSED]) for sop_class in sorted(by_class)]
    as_stored = [
        (sop_class, [syntax])
        for sop_class, stored in sorted(by_class.items())
        for syntax in sorted(stored)
        if syntax not in UNCOMPRESSED
    ]
    # Past 128 contexts the compressed ones go first: those instances are then decoded.
    return (fallbacks + as_stored)[:MAX_PRESENTATION_CONTEXTS]


@dataclass
class OutgoingStore:
    """One C-STORE sub-operation made ready to send: its context, its command and its data
    set, the stored file open at the data set (``stream``, ``prefix``: :func:`skip_file_meta`)
    or transcoded (``data_set``)."""

    context: Context
    command: dict[str, Any]
    stream: BlobStream | None = None
    prefix: bytes = b""
    data_set: bytes | None = None

    @property
    def message_id(self) -> int:
        return int(self.command["MessageID"])

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def prepare_store(
    store_assoc: Association,
    archive: Archive,
    stored: StoredInstance,
    transcode_max_bytes: int,
    *,
    move_originator: tuple[str, int] | None = None,
) -> OutgoingStore:
    """Everything one C-STORE sub-operation needs before the wire: the context, a message ID,
    the command, the stored file opened (or the instance transcoded). Raise SubOperationFailed
    when it cannot be sent to this peer."""
    contexts = [
        c
        for c in store_assoc.contexts.values()
        if c.abstract_syntax == stored.sop_class_uid and c.as_scu
    ]
    if not contexts:
        raise SubOperationFailed(f"the peer accepted no context for {stored.sop_class_uid}")
    command = {
        "AffectedSOPClassUID": stored.sop_class_uid,
        "CommandField": CommandField.C_STORE_RQ,
        "MessageID": store_assoc.next_message_id(),
        "Priority": PRIORITY_MEDIUM,
        "AffectedSOPInstanceUID": stored.sop_instance_uid,
    }
    if move_originator is not None:
        # PS3.7 9.1.1.1: a C-STORE performed for a C-MOVE names who asked for it.
        command["MoveOriginatorApplicationEntityTitle"] = move_originator[0]
        command["MoveOriginatorMessageID"] = move_originator[1]
    as_stored = next((c for c in contexts if c.transfer_syntax == stored.transfer_syntax_uid), None)
    if as_stored is not None:
        stream = archive.blobs.open(stored.blob_key, tier=stored.tier)
        try:
            data_set_start = skip_file_meta(stream)
        except BaseException:
            stream.close()
            raise
        if data_set_start is not None:
            return OutgoingStore(as_stored, command, stream, data_set_start)
        stream.close()
    context, data_set = _transcoded(archive, stored, contexts, transcode_max_bytes)
    return OutgoingStore(context, command, data_set=data_set)


def send_store(store_assoc: Association, outgoing: OutgoingStore) -> None:
    """Send the C-STORE-RQ and its data set; the stored file is closed."""
    try:
        if outgoing.stream is not None:
            store_assoc.send_message_stream(
                outgoing.context, outgoing.command, outgoing.stream, prefix=outgoing.prefix
            )
        else:
            store_assoc.send_command(outgoing.context, outgoing.command, outgoing.data_set)
    finally:
        outgoing.close()


def store_instance(
    store_assoc: Association,
    archive: Archive,
    stored: StoredInstance,
    transcode_max_bytes: int,
    *,
    move_originator: tuple[str, int] | None = None,
) -> int:
    """Perform one C-STORE sub-operation; return the peer's status. Raise SubOperationFailed
    when it cannot be sent."""
    outgoing = prepare_store(
        store_assoc, archive, stored, transcode_max_bytes, move_originator=move_originator
    )
    send_store(store_assoc, outgoing)
    return await_store_response(store_assoc, outgoing.message_id, None)


def await_store_response(store_assoc: Association, message_id: int, cancel_of: int | None) -> int:
    """The peer's status for C-STORE ``message_id``. Raise SubOperationCancelled when a
    C-CANCEL of request ``cancel_of`` arrived meanwhile (C-GET: the SCU's own association;
    the response is still awaited)."""
    cancelled = False
    while True:
        response = store_assoc.receive_message()
        if response is None:
            raise ProtocolError("the peer released the association during a C-STORE")
        field = response.command.field
        if field == CommandField.C_CANCEL_RQ and cancel_of is not None:
            cancelled = cancelled or _cancels(response, cancel_of)
            continue
        if field != CommandField.C_STORE_RSP:
            raise ProtocolError(
                f"command 0x{field:04X} where a C-STORE-RSP was expected",
                AbortReason.UNEXPECTED_PDU,
            )
        if int(response.command.get("MessageIDBeingRespondedTo", -1)) != message_id:
            raise ProtocolError("a C-STORE-RSP to another message", AbortReason.UNEXPECTED_PDU)
        status = int(response.command.get("Status", 0xC000))
        if cancelled:
            raise SubOperationCancelled(status)
        return status


def _cancels(message: Message, message_id: int) -> bool:
    return int(message.command.get("MessageIDBeingRespondedTo", -1)) == message_id


def _transcoded(
    archive: Archive, stored: StoredInstance, contexts: list[Context], transcode_max_bytes: int
) -> tuple[Context, bytes]:
    """The accepted context to send the instance on, and its data set encoded for it (in a
    decoder process: :func:`server.transcoding.transcoded_instance`)."""
    accepted = {c.transfer_syntax: c for c in contexts}
    stored_syntax = UID(stored.transfer_syntax_uid)
    if stored_syntax in accepted:
        target = accepted[stored_syntax]  # a file without a preamble: read and re-encoded
    else:
        uncompressed = [accepted[s] for s in UNCOMPRESSED if s in accepted]
        if not uncompressed:
            raise SubOperationFailed(
                f"stored as {stored_syntax.name}; the peer accepts only "
                + ", ".join(UID(s).name for s in accepted)
            )
        target = uncompressed[0]
    encoding = (target.implicit_vr, target.little_endian, target.deflated)
    try:
        data_set = transcoded_instance(
            archive, stored, target.transfer_syntax, transcode_max_bytes, encoding
        )
    except TranscodingRefused as refused:
        raise SubOperationFailed(str(refused)) from refused
    return target, data_set
