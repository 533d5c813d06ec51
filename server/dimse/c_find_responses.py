"""Pending C-FIND responses, gathered and written in batches.

The pending responses of one request differ only in their Identifier, so the command set is
encoded once (PS3.7 9.3.2.2, always implicit VR little endian, PS3.7 6.3.1); each Identifier is
encoded straight from its row (:mod:`server.dimse.response_encoding`) in a little endian
context, or by pydicom in any other (big endian, deflated); each is framed in P-DATA-TF PDUs
within the peer's maximum length (PS3.8 9.3.5, D.1.1), and many responses leave in one write.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from server.dimse.association import Association, Context
from server.dimse.commands import DATA_SET_PRESENT, CommandField, encode_command
from server.dimse.identifier import QueryRequest, response_identifier
from server.dimse.pdu import p_data
from server.dimse.response_encoding import ResponseIdentifierEncoder, Unsupported
from server.dimse.statuses import PENDING

# Bytes of responses gathered before one write: few system calls, little memory held, and a
# slow SCU blocks the write, so the SCP never holds more than this of its result.
BATCH_BYTES = 64 * 1024
# ... or once its first response has waited this long, so a slow cursor still streams.
BATCH_SECONDS = 0.05


class PendingResponses:
    """The pending responses of one C-FIND request, gathered and written in batches."""

    def __init__(
        self,
        assoc: Association,
        context: Context,
        message_id: int,
        request: QueryRequest,
        retrieve_ae_title: str,
    ) -> None:
        self._assoc = assoc
        self._context = context
        command_set = encode_command(
            {
                "AffectedSOPClassUID": context.abstract_syntax,
                "CommandField": CommandField.C_FIND_RSP,
                "MessageIDBeingRespondedTo": message_id,
                "CommandDataSetType": DATA_SET_PRESENT,
                "Status": PENDING,
            }
        )
        self._command = self._pdus(command_set, command=True)
        self._encode = _identifier_encoder(assoc, context, request, retrieve_ae_title)
        self._batch: list[bytes] = []
        self._size = 0
        self._started = 0.0

    def add(self, row: Mapping[str, Any]) -> None:
        """Gather the pending response for ``row``; write the batch once it is full."""
        identifier = self._pdus(self._encode(row), command=False)
        if not self._batch:
            self._started = time.monotonic()
        self._batch += (self._command, identifier)
        self._size += len(self._command) + len(identifier)
        if self._size >= BATCH_BYTES or time.monotonic() - self._started >= BATCH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the gathered responses (blocking while the peer does not read them)."""
        if self._batch:
            self._assoc.wire.send(b"".join(self._batch))
            self.discard()

    def discard(self) -> None:
        """Forget the gathered responses (C-CANCEL: the SCU wants no more)."""
        self._batch.clear()
        self._size = 0

    def _pdus(self, data: bytes, *, command: bool) -> bytes:
        return p_data(self._context.id, data, command=command, max_pdu=self._assoc.max_pdu_send)


def _identifier_encoder(
    assoc: Association, context: Context, request: QueryRequest, retrieve_ae_title: str
) -> Callable[[Mapping[str, Any]], bytes]:
    implicit_vr_of: dict[str, bool] = {ImplicitVRLittleEndian: True, ExplicitVRLittleEndian: False}
    implicit_vr = implicit_vr_of.get(context.transfer_syntax)
    if implicit_vr is not None:
        try:
            return ResponseIdentifierEncoder(
                request, retrieve_ae_title, implicit_vr=implicit_vr
            ).encode
        except Unsupported:
            pass

    def with_pydicom(row: Mapping[str, Any]) -> bytes:
        return assoc.encode_data_set(context, response_identifier(request, row, retrieve_ae_title))

    return with_pydicom
