"""One established association, either side: DIMSE messages read and written on Hilum's wire.

A message is a command set and, when the command says so, a data set (PS3.7 6.3), each carried
in PDV fragments (PS3.8 E.2). The command set is small and held in memory; the data set goes,
fragment by fragment and chunk by chunk, to a :class:`DataSink` chosen for that command (a
file for a C-STORE, a bounded buffer for a query Identifier), so memory per association does not
grow with the PDU length or the instance size.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode, encode

from server.access import Action
from server.context import Principal, RequestContext
from server.dimse.commands import (
    DATA_SET_PRESENT,
    MAX_COMMAND_SET,
    NO_DATA_SET,
    Command,
    CommandField,
    decode_command,
    encode_command,
)
from server.dimse.pdu import (
    A_ABORT,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    COMMAND_BIT,
    LAST_BIT,
    P_DATA_TF,
    PDV_HEADER,
    PDV_OVERHEAD,
    AbortReason,
    MessageBroken,
    PduSocket,
    PeerAborted,
    PeerGone,
    ProtocolError,
    abort,
    p_data,
    p_data_header,
    release_request,
    release_response,
)
from server.dimse.statuses import PENDING
from storage.audit import Transfer
from storage.blobs import BlobStream

log = logging.getLogger(__name__)
_association_ids = itertools.count(1)

# Bytes per second a message in progress must average, beyond its first idle timeout.
MIN_MESSAGE_RATE = 1024
# A query or retrieve Identifier (PS3.4 C.4.1.1.3) is a few hundred bytes; this is generous.
MAX_IDENTIFIER = 1 << 20
# A streamed data set's PDUs are written to the socket in batches of about this many bytes.
SEND_BATCH_BYTES = 256 * 1024


@dataclass(frozen=True)
class Context:
    """An accepted presentation context (PS3.8 9.3.3.2)."""

    id: int
    abstract_syntax: str
    transfer_syntax: str
    # Roles of *this* side (PS3.7 D.3.3.4): may it send requests (SCU) / answer them (SCP).
    as_scu: bool = True
    as_scp: bool = True

    @property
    def implicit_vr(self) -> bool:
        return UID(self.transfer_syntax).is_implicit_VR

    @property
    def little_endian(self) -> bool:
        return UID(self.transfer_syntax).is_little_endian

    @property
    def deflated(self) -> bool:
        return UID(self.transfer_syntax).is_deflated


class DataSink(Protocol):
    """Where a message's data set goes as its fragments arrive."""

    def write(self, chunk: memoryview) -> None: ...


class BufferSink:
    """A data set held in memory, up to ``limit`` bytes (a query Identifier, a response's)."""

    def __init__(self, limit: int = MAX_IDENTIFIER) -> None:
        self.limit = limit
        self.buffer = bytearray()

    def write(self, chunk: memoryview) -> None:
        if len(self.buffer) + len(chunk) > self.limit:
            raise ProtocolError(
                f"a data set of over {self.limit} bytes where an Identifier was expected",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        self.buffer += chunk


@dataclass
class Message:
    command: Command
    context: Context
    data: Any = None  # the DataSink the data set went to, or None

    @property
    def message_id(self) -> int:
        return int(self.command.get("MessageID", 0))


SinkFactory = Callable[[Command, Context], DataSink]


def buffer_sink(_command: Command, _context: Context) -> DataSink:
    return BufferSink()


@dataclass
class AssociationStats:
    services: set[str] = field(default_factory=set)
    stored: int = 0
    refused: int = 0
    # C-STORE sub-operations of C-MOVE / C-GET by outcome (completed, warning, failed).
    sub_operations: dict[str, int] = field(default_factory=dict)


class Association:
    """The DIMSE layer of an established association (PS3.7 7, PS3.8 9.3.5)."""

    def __init__(
        self,
        wire: PduSocket,
        contexts: Iterable[Context],
        *,
        calling_ae_title: str,
        called_ae_title: str,
        peer_address: str,
        max_pdu_receive: int,
        max_pdu_send: int,
    ) -> None:
        self.wire = wire
        self.contexts = {context.id: context for context in contexts}
        self.calling_ae_title = calling_ae_title
        self.called_ae_title = called_ae_title
        self.peer_address = peer_address
        self.max_pdu_receive = max_pdu_receive  # what this side offered (0: no limit)
        self.max_pdu_send = max_pdu_send  # what the peer offered
        self.name = f"A{next(_association_ids)}"
        # Who is asking, from where, in which partition (server.context): the calling AE until
        # the association policy says more.
        self.context = RequestContext(
            Principal("ae", calling_ae_title), peer_address, "dimse", request_id=self.name
        )
        # The instances it sends, audited per study when their transfer begins and ends
        # (made with the first C-STORE, once the association policy has set the context).
        self.transfer: Transfer | None = None

        # What the peer may ask of this side (the acceptor's association policy sets it):
        # nothing until then.
        self.permitted: frozenset[Action] = frozenset()
        self.started = time.monotonic()
        self.stats = AssociationStats()
        self.is_open = True
        self.last_status: int | None = None  # of the last final response sent
        self._pdu_remaining = 0  # bytes of the P-DATA-TF being read not consumed yet
        self._next_message_id = 1

    # -- receiving ------------------------------------------------------------------------

    def receive_message(
        self, sink_for: SinkFactory = buffer_sink, *, idle_timeout: float | None = None
    ) -> Message | None:
        """The next DIMSE message, its data set streamed to ``sink_for(command, context)``;
        None when the peer released the association (answered here)."""
        command_bytes = bytearray()
        command: Command | None = None
        context: Context | None = None
        sink: DataSink | None = None
        began: float | None = None  # the first PDV of this message
        received = 0
        while True:
            if began is not None:
                self._check_progress(began, received)
            if not self._pdu_remaining:
                started = command is not None or bool(command_bytes)
                pdu_type, length = self.wire.read_pdu_header(
                    idle_timeout=None if started else idle_timeout
                )
                if pdu_type != P_DATA_TF:
                    self._other_pdu(pdu_type, length, mid_message=started)
                    return None
                if self.max_pdu_receive and length > self.max_pdu_receive:
                    # PS3.8 D.1.1: the peer may not exceed the length this side offered.
                    raise ProtocolError(
                        f"a P-DATA-TF of {length} bytes; {self.max_pdu_receive} were offered",
                        AbortReason.INVALID_PDU_PARAMETER_VALUE,
                    )
                if length < PDV_OVERHEAD:
                    raise ProtocolError(
                        "a P-DATA-TF without a PDV item", AbortReason.INVALID_PDU_PARAMETER_VALUE
                    )
                self._pdu_remaining = length
            if self._pdu_remaining < PDV_OVERHEAD:
                raise ProtocolError("a truncated PDV item", AbortReason.INVALID_PDU_PARAMETER_VALUE)
            item_length, context_id, control = PDV_HEADER.unpack(self.wire.read_exact(PDV_OVERHEAD))
            if item_length < 2 or item_length + 4 > self._pdu_remaining:
                raise ProtocolError(
                    f"a PDV item of {item_length} bytes in {self._pdu_remaining}",
                    AbortReason.INVALID_PDU_PARAMETER_VALUE,
                )
            self._pdu_remaining -= item_length + 4
            fragment = item_length - 2
            if began is None:
                began = time.monotonic()
            received += fragment
            this_context = self.contexts.get(context_id)
            if this_context is None:
                raise ProtocolError(
                    f"a PDV for presentation context {context_id}, which was not accepted",
                    AbortReason.UNEXPECTED_PDU_PARAMETER,
                )
            if context is None:
                context = this_context
            elif this_context is not context:
                raise ProtocolError(
                    "a message's fragments on two presentation contexts",
                    AbortReason.UNEXPECTED_PDU_PARAMETER,
                )
            if control & COMMAND_BIT:
                if command is not None:
                    raise ProtocolError(
                        "a command fragment inside a data set", AbortReason.UNEXPECTED_PDU_PARAMETER
                    )
                if len(command_bytes) + fragment > MAX_COMMAND_SET:
                    raise ProtocolError(
                        f"a command set of over {MAX_COMMAND_SET} bytes",
                        AbortReason.INVALID_PDU_PARAMETER_VALUE,
                    )
                command_bytes += self.wire.read_exact(fragment)
                if control & LAST_BIT:
                    command = decode_command(bytes(command_bytes))
                    if not command.has_data_set:
                        return Message(command, context)
                    sink = sink_for(command, context)
                continue
            if command is None or sink is None:
                raise ProtocolError(
                    "a data set fragment before its command set",
                    AbortReason.UNEXPECTED_PDU_PARAMETER,
                )
            for chunk in self.wire.stream(fragment):
                sink.write(chunk)
            if control & LAST_BIT:
                return Message(command, context, sink)

    def _check_progress(self, began: float, received: int) -> None:
        """A message must keep arriving: ``idle_timeout`` after its first fragment, and one more
        second per :data:`MIN_MESSAGE_RATE` bytes received. Every PDU arriving in time is not
        enough: a peer trickling empty or one-byte fragments would hold the association (and
        its thread) forever; a slow but real link is never cut (at 1 KiB/s a 500 MB slide has
        six days)."""
        if time.monotonic() > began + self.wire.idle_timeout + received / MIN_MESSAGE_RATE:
            raise ProtocolError(
                f"a message arriving slower than {MIN_MESSAGE_RATE} bytes/s "
                f"({received} bytes in {time.monotonic() - began:.0f} s)"
            )

    def _other_pdu(self, pdu_type: int, length: int, *, mid_message: bool) -> None:
        body = self.wire.read_body(length, limit=1024)
        if pdu_type == A_ABORT:
            self.is_open = False
            source = body[2] if len(body) > 2 else 0
            raise PeerAborted(f"A-ABORT from the peer (source {source})")
        if pdu_type == A_RELEASE_RQ and not mid_message:
            # PS3.8 7.2: the release request is answered; the requestor closes the transport.
            self.wire.send(release_response())
            self.is_open = False
            return
        raise ProtocolError(
            f"PDU type 0x{pdu_type:02X} where a P-DATA-TF was expected",
            AbortReason.UNEXPECTED_PDU,
        )

    def cancel_requested(self, message_id: int) -> bool:
        """Whether the peer sent a C-CANCEL for ``message_id`` (PS3.7 9.3.2.3): read it if
        something arrived. With an asynchronous operations window of one (PS3.7 D.3.3.3) a
        C-CANCEL, an A-ABORT or a release is all the peer may send while a request runs."""
        if not self.wire.is_readable():
            return False
        message = self.receive_message()
        if message is None:
            raise PeerGone("the peer released the association during a request")
        if message.command.field == CommandField.C_CANCEL_RQ:
            return int(message.command.get("MessageIDBeingRespondedTo", -1)) == message_id
        raise ProtocolError(
            f"command 0x{message.command.field:04X} while a request was in progress",
            AbortReason.UNEXPECTED_PDU,
        )

    # -- sending --------------------------------------------------------------------------

    def send_command(
        self, context: Context, values: dict[str, Any], data_set: bytes | None = None
    ) -> None:
        """One message: the command set and, when given, its (already encoded) data set."""
        out = self._command_pdus(context, values, data_set_present=data_set is not None)
        if data_set is not None:
            out += p_data(context.id, data_set, command=False, max_pdu=self.max_pdu_send)
        self.wire.send(out)

    def _command_pdus(
        self, context: Context, values: dict[str, Any], *, data_set_present: bool
    ) -> bytes:
        values = dict(values)
        if int(values.get("CommandField", 0)) & 0x8000 and values.get("Status") != PENDING:
            self.last_status = int(values.get("Status", 0))
        values["CommandDataSetType"] = DATA_SET_PRESENT if data_set_present else NO_DATA_SET
        return p_data(context.id, encode_command(values), command=True, max_pdu=self.max_pdu_send)

    def send_message_stream(
        self, context: Context, values: dict[str, Any], stream: BlobStream, *, prefix: bytes = b""
    ) -> int:
        """One message whose data set is ``prefix`` then ``stream`` to its end: the command
        set, then the data set in PDUs within the peer's limit, the last fragment flagged;
        returns the data set's bytes sent (one read ahead, to flag the last fragment).

        A read of ``stream`` that fails before anything was sent is raised as it is (the message
        was not begun); once part of the message was sent, the association is aborted and
        :class:`MessageBroken` raised."""
        command = self._command_pdus(context, values, data_set_present=True)
        size = (self.max_pdu_send - PDV_OVERHEAD) if self.max_pdu_send else 1 << 20
        size = max(1, min(size, 4 << 20))
        # Small PDUs (16 KB from DCMTK's tools) go several to a send: one system call per
        # ~256 KiB instead of one per PDU, the same bytes on the wire; the command set goes
        # with the first of them.
        pdus_per_send = max(1, SEND_BATCH_BYTES // size)
        sent = 0
        begun = False  # part of the message on the wire
        pending: list[bytes] = [command]
        chunk = prefix + stream.read(size - len(prefix)) if len(prefix) < size else prefix
        while True:
            try:
                following = stream.read(size) if chunk else b""
            except Exception as error:
                if not begun:
                    raise
                self.abort()
                raise MessageBroken(
                    f"the data set could not be read once part of it was sent ({error}): "
                    "association aborted"
                ) from error
            last = LAST_BIT if not following else 0
            pending += (p_data_header(context.id, len(chunk), last), chunk)
            sent += len(chunk)
            if last or len(pending) >= 2 * pdus_per_send:
                self.wire.send(b"".join(pending))
                pending.clear()
                begun = True
            if last:
                return sent
            chunk = following

    def next_message_id(self) -> int:
        message_id = self._next_message_id
        self._next_message_id = message_id % 0xFFFF + 1
        return message_id

    def decode_data_set(self, message: Message) -> Dataset:
        """The message's data set (held in a :class:`BufferSink`) as a pydicom Dataset."""
        assert isinstance(message.data, BufferSink)
        context = message.context
        return decode(
            BytesIO(bytes(message.data.buffer)),
            context.implicit_vr,
            context.little_endian,
            context.deflated,
        )

    def encode_data_set(self, context: Context, ds: Dataset) -> bytes:
        encoded = encode(ds, context.implicit_vr, context.little_endian, context.deflated)
        if encoded is None:
            raise ValueError("the data set cannot be encoded")
        return encoded

    # -- ending ---------------------------------------------------------------------------

    def abort(self, reason: AbortReason = AbortReason.NOT_SPECIFIED) -> None:
        if self.is_open:
            self.is_open = False
            with contextlib.suppress(PeerGone):
                self.wire.send(abort(reason))
        self.wire.close()

    def release(self, timeout: float = 30.0) -> None:
        """Release as the requestor (PS3.8 7.2): A-RELEASE-RQ, wait for the RP, close."""
        try:
            if self.is_open:
                self.wire.send(release_request())
                pdu_type, length = self.wire.read_pdu_header(idle_timeout=timeout)
                self.wire.read_body(length, limit=1024)
                if pdu_type != A_RELEASE_RP:
                    log.debug("[%s] PDU 0x%02X in answer to a release", self.name, pdu_type)
        except (PeerGone, ProtocolError):
            pass
        finally:
            self.is_open = False
            self.wire.close()


def configure_socket(sock: socket.socket) -> None:
    """Every DIMSE connection, accepted or requested: send each PDU at once (TCP_NODELAY).

    A DIMSE message leaves as a command PDU followed by data set PDUs. With Nagle's algorithm
    the last, small segment waits for the peer's delayed ACK of the previous one (40 ms on
    Linux). DCMTK disables Nagle for the same reason when TCP_NODELAY is set in its environment.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
