"""Pending C-FIND responses written in batches straight to the association's socket.

pynetdicom sends each DIMSE message on its own: a Dataset encoded by pydicom, a C-FIND
primitive turned into a message, P-DATA primitives queued for the DUL thread, which polls its
queue every millisecond and sends one PDU per turn of its state machine: about 0.75 ms of
Python per match. The pending responses of one request differ only in their Identifier, so
here the command set is encoded once (PS3.7 9.3.2.2, always implicit VR little endian, PS3.7
6.3.1), each Identifier is encoded straight from its row (:mod:`server.dimse.response_encoding`)
and framed in P-DATA-TF PDUs (PS3.8 9.3.5, E.2), and many responses leave in one ``sendall``.

Everything else stays with pynetdicom: the association, the request, C-CANCEL, the final
response. pynetdicom's DUL thread also writes to that socket, but only what pynetdicom queued
(and an A-ABORT of its own on a protocol error); so a batch is written only when its queue is
empty. Nothing of this association is then in flight: with an asynchronous operations window of
one (PS3.7 D.3.3.3; pynetdicom answers any proposal with 1/1) the SCU sends a request only after
the final response of the previous one has reached it. The final response of this request is
queued after the last batch is written.

A context with a transfer syntax other than implicit or explicit VR little endian, or a
request :class:`ResponseIdentifierEncoder` cannot serve, gets pynetdicom's own path, one
message per match (:func:`pending_responses` returns None).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import time
from collections.abc import Mapping
from io import BytesIO
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.events import Event

from server.dimse.identifier import QueryRequest
from server.dimse.response_encoding import ResponseIdentifierEncoder, Unsupported
from server.dimse.statuses import PENDING
from server.dimse.transport import keep_alive

log = logging.getLogger(__name__)

# Bytes of responses gathered before one sendall: few system calls, little memory held, and a
# slow SCU blocks sendall, so the SCP never holds more than this of its result.
BATCH_BYTES = 64 * 1024
# ... or once its first response has waited this long, so a slow cursor still streams.
BATCH_SECONDS = 0.05
# PS3.8 9.3.5 / E.2: PDU type, reserved, PDU length; PDV item length, context ID, header.
_PDU = struct.Struct(">BBIIBB")
_PDV_OVERHEAD = 6  # a PDV item's length field, context ID and message control header
COMMAND_LAST, COMMAND_MORE = 0x03, 0x01
DATA_SET_LAST, DATA_SET_MORE = 0x02, 0x00


class ConnectionLost(Exception):
    """The peer closed the connection while a batch was being written."""


class PendingResponses:
    """The pending responses of one C-FIND request, gathered and written in batches."""

    def __init__(
        self,
        assoc: Association,
        sock: socket.socket,
        context_id: int,
        max_pdu_length: int,
        command_set: bytes,
        encoder: ResponseIdentifierEncoder,
    ) -> None:
        self._assoc = assoc
        self._socket = sock
        self._context_id = context_id
        # PS3.8 D.1.1: the peer's Maximum Length Received bounds each PDU's PDV items; 0: none.
        self._max_data = max_pdu_length - _PDV_OVERHEAD if max_pdu_length else 0
        self._command = self._pdus(command_set, COMMAND_LAST, COMMAND_MORE)
        self._encoder = encoder
        self._batch: list[bytes] = []
        self._size = 0
        self._started = 0.0

    def add(self, row: Mapping[str, Any]) -> None:
        """Gather the pending response for ``row``; write the batch once it is full."""
        identifier = self._pdus(self._encoder.encode(row), DATA_SET_LAST, DATA_SET_MORE)
        if not self._batch:
            self._started = time.monotonic()
        self._batch += (self._command, identifier)
        self._size += len(self._command) + len(identifier)
        if self._size >= BATCH_BYTES or time.monotonic() - self._started >= BATCH_SECONDS:
            self.flush()
        else:
            keep_alive(self._assoc)

    def flush(self) -> None:
        """Write the gathered responses (blocking while the peer does not read them)."""
        if not self._batch:
            return
        queue = self._assoc.dul.to_provider_queue
        while not queue.empty() and self._assoc.is_established:
            time.sleep(0.001)
        try:
            self._socket.sendall(b"".join(self._batch))
        except OSError as error:
            raise ConnectionLost(str(error)) from error
        self._batch.clear()
        self._size = 0
        keep_alive(self._assoc)

    def discard(self) -> None:
        """Forget the gathered responses (C-CANCEL: the SCU wants no more)."""
        self._batch.clear()
        self._size = 0

    def _pdus(self, data: bytes, last: int, more: int) -> bytes:
        """``data`` as P-DATA-TF PDUs of one PDV each, fragments within the peer's limit."""
        size = self._max_data or len(data)
        pdus = []
        for start in range(0, max(len(data), 1), size):
            fragment = data[start : start + size]
            control = last if start + size >= len(data) else more
            length = len(fragment)
            pdus.append(_PDU.pack(0x04, 0, length + 6, length + 2, self._context_id, control))
            pdus.append(fragment)
        return b"".join(pdus)


def pending_responses(
    event: Event, request: QueryRequest, retrieve_ae_title: str
) -> PendingResponses | None:
    """The batched writer of ``event``'s pending responses, or None for pynetdicom's path."""
    assoc = event.assoc
    context_id, _, transfer_syntax = event.context
    implicit_vr = {ImplicitVRLittleEndian: True, ExplicitVRLittleEndian: False}.get(transfer_syntax)
    association_socket = assoc.dul.socket
    sock = association_socket.socket if association_socket else None
    max_pdu_length = int(assoc.dimse.maximum_pdu_size or 0)
    if implicit_vr is None or sock is None or isinstance(sock, ssl.SSLSocket):
        return None
    if max_pdu_length and max_pdu_length <= _PDV_OVERHEAD:
        return None
    try:
        encoder = ResponseIdentifierEncoder(request, retrieve_ae_title, implicit_vr=implicit_vr)
    except Unsupported as reason:
        log.info("[%s] C-FIND responses one at a time: %s", assoc.name, reason)
        return None
    return PendingResponses(assoc, sock, context_id, max_pdu_length, _command_set(event), encoder)


def _command_set(event: Event) -> bytes:
    """The command set of every pending response to ``event``'s request, as pynetdicom
    builds it (PS3.7 9.3.2.2: Status Pending, a data set present)."""
    request = event.request
    response = C_FIND()
    response.MessageID = request.MessageID
    response.MessageIDBeingRespondedTo = request.MessageID
    response.AffectedSOPClassUID = request.AffectedSOPClassUID
    response.Status = PENDING
    response.Identifier = BytesIO(b"\x00\x00")  # any: only its presence is encoded
    message = C_FIND_RSP()
    message.primitive_to_message(response)
    return bytes(encode(message.command_set, True, True))
