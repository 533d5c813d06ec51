"""The Upper Layer wire (PS3.8 9): PDU framing, read from a socket with bounded memory.

Hilum reads every PDU itself: the 6-byte header first, then, for a P-DATA-TF, each PDV item's
header and its fragment in chunks of at most :data:`CHUNK` bytes, handed to whoever consumes
that fragment (a file, for a C-STORE data set). So an association holds a constant amount of
memory whatever PDU length it offered and whatever the instance size. The association PDUs
(A-ASSOCIATE-RQ/AC/RJ) are small and decoded with pynetdicom's PDU classes, as codecs.

Every read has a deadline: a PDU must arrive whole within ``pdu_timeout`` of its first byte, so
a peer that trickles a byte at a time is aborted, not waited for.
"""

from __future__ import annotations

import contextlib
import enum
import select
import socket
import struct
import time
from collections.abc import Iterator

# PS3.8 9.3.1, Table 9-1: PDU types.
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_TYPES = frozenset(range(0x01, 0x08))

PDU_HEADER = struct.Struct(">BBI")  # type, reserved, length (PS3.8 9.3.1)
PDV_HEADER = struct.Struct(">IBB")  # item length, presentation context ID, control header
PDV_OVERHEAD = PDV_HEADER.size  # per PDV item, counted within a P-DATA-TF's length
# PS3.8 E.2: the message control header's bits.
COMMAND_BIT, LAST_BIT = 0x01, 0x02

# Bytes moved from the socket per read: a fixed buffer per association.
CHUNK = 64 * 1024
# An association PDU (A-ASSOCIATE-RQ with 128 presentation contexts of many transfer syntaxes
# is some 60 KB) larger than this is refused rather than held.
MAX_ASSOCIATION_PDU = 1 << 20
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class AbortReason(enum.IntEnum):
    """PS3.8 9.3.8, Table 9-26: A-ABORT reasons when the service provider aborts (source 2)."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


class AssociationEnded(Exception):
    """The association cannot go on: the peer broke the protocol, went away, or aborted."""


class ProtocolError(AssociationEnded):
    """The peer broke PS3.8: the association ends with an A-ABORT carrying ``reason``."""

    def __init__(self, message: str, reason: AbortReason = AbortReason.NOT_SPECIFIED) -> None:
        super().__init__(message)
        self.reason = reason


class PeerGone(AssociationEnded):
    """The connection closed or timed out: nothing more can be sent on it."""


class PeerAborted(AssociationEnded):
    """The peer sent an A-ABORT."""


class MessageBroken(AssociationEnded):
    """A message could not be completed once part of it was on the wire (its data set could
    not be read further): the association was aborted, as nothing but the rest of that message
    may follow a P-DATA-TF fragment without its last-fragment flag (PS3.8 9.3.5, E.2)."""


def encode_pdu(pdu_type: int, body: bytes) -> bytes:
    return PDU_HEADER.pack(pdu_type, 0, len(body)) + body


def release_request() -> bytes:
    return encode_pdu(A_RELEASE_RQ, bytes(4))  # PS3.8 9.3.6: four reserved bytes


def release_response() -> bytes:
    return encode_pdu(A_RELEASE_RP, bytes(4))


def abort(reason: AbortReason, source: int = 2) -> bytes:
    """PS3.8 9.3.8: source 0 is the service user (no reason given), 2 the service provider."""
    return encode_pdu(A_ABORT, bytes([0, 0, source, int(reason) if source == 2 else 0]))


def p_data(context_id: int, data: bytes | memoryview, *, command: bool, max_pdu: int) -> bytes:
    """``data`` as P-DATA-TF PDUs of one PDV each, every PDU within the peer's Maximum Length
    Received (PS3.8 D.1.1; 0: no limit). The last fragment carries the last bit (PS3.8 E.2)."""
    fragment_size = max_pdu - PDV_OVERHEAD if max_pdu else max(len(data), 1)
    control = COMMAND_BIT if command else 0
    out = []
    total = len(data)
    for start in range(0, max(total, 1), fragment_size):
        fragment = data[start : start + fragment_size]
        last = LAST_BIT if start + fragment_size >= total else 0
        out.append(p_data_header(context_id, len(fragment), control | last))
        out.append(bytes(fragment))
    return b"".join(out)


def p_data_header(context_id: int, fragment_length: int, control: int) -> bytes:
    """A P-DATA-TF PDU header with one PDV item header, for a fragment sent right after it."""
    return PDU_HEADER.pack(P_DATA_TF, 0, fragment_length + PDV_OVERHEAD) + PDV_HEADER.pack(
        fragment_length + 2, context_id, control
    )


class PduSocket:
    """Reads and writes PDUs on one connection; every read bounded by a deadline."""

    def __init__(self, sock: socket.socket, *, idle_timeout: float, pdu_timeout: float) -> None:
        self.sock = sock
        self.idle_timeout = idle_timeout
        self.pdu_timeout = pdu_timeout
        self._buffer = bytearray(CHUNK)
        self._view = memoryview(self._buffer)
        self._deadline = 0.0

    # -- reading --------------------------------------------------------------------------

    def read_pdu_header(self, *, idle_timeout: float | None = None) -> tuple[int, int]:
        """Wait up to the idle timeout for the next PDU; return its type and length."""
        wait = self.idle_timeout if idle_timeout is None else idle_timeout
        self._acknowledge_promptly()
        self._deadline = time.monotonic() + wait
        # What has arrived of the header, at least its first byte: usually all six at once.
        got = self._recv_into(PDU_HEADER.size)
        self._deadline = time.monotonic() + self.pdu_timeout
        while got < PDU_HEADER.size:
            got += self._recv_into(PDU_HEADER.size - got, offset=got)
        pdu_type, _reserved, length = PDU_HEADER.unpack_from(self._buffer)
        if pdu_type not in PDU_TYPES:
            raise ProtocolError(f"unknown PDU type 0x{pdu_type:02X}", AbortReason.UNRECOGNIZED_PDU)
        return pdu_type, length

    def _acknowledge_promptly(self) -> None:
        """Acknowledge what arrives next at once (TCP_QUICKACK, Linux; not sticky, hence
        before every wait). A peer with Nagle's algorithm on (DCMTK without TCP_NODELAY, many
        modalities) holds its last small segment until the previous one is acknowledged: a
        delayed ACK would stall every message by 40 ms."""
        if _QUICKACK is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def read_body(self, length: int, limit: int = MAX_ASSOCIATION_PDU) -> bytes:
        """The whole body of a small PDU (association, release, abort)."""
        if length > limit:
            raise ProtocolError(
                f"a PDU of {length} bytes (at most {limit})",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        return self._read_exact(length)

    def read_exact(self, length: int) -> bytes:
        """``length`` bytes of the PDU being read (its deadline still runs)."""
        return self._read_exact(length)

    def stream(self, length: int) -> Iterator[memoryview]:
        """``length`` bytes of the PDU being read, as views of the one buffer (each valid
        until the next is taken)."""
        remaining = length
        while remaining:
            n = self._recv_into(min(remaining, CHUNK))
            remaining -= n
            yield self._view[:n]

    def skip(self, length: int) -> None:
        for _chunk in self.stream(length):
            pass

    def is_readable(self) -> bool:
        """Whether the peer has sent something not read yet (no wait)."""
        pending = getattr(self.sock, "pending", None)  # ssl.SSLSocket: bytes already decrypted
        if pending is not None and pending():
            return True
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def _read_exact(self, length: int) -> bytes:
        if length <= CHUNK:
            got = 0
            while got < length:
                got += self._recv_into(length - got, offset=got)
            return bytes(self._view[:length])
        return b"".join(bytes(chunk) for chunk in self.stream(length))

    def _recv_into(self, size: int, offset: int = 0) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise PeerGone("timed out")
        try:
            self.sock.settimeout(remaining)
            n = self.sock.recv_into(self._view[offset : offset + size])
        except TimeoutError as error:
            raise PeerGone("timed out") from error
        except OSError as error:
            raise PeerGone(str(error) or type(error).__name__) from error
        if n == 0:
            raise PeerGone("connection closed by the peer")
        return n

    # -- writing --------------------------------------------------------------------------

    def send(self, data: bytes | memoryview) -> None:
        try:
            if self.sock.gettimeout() != self.pdu_timeout:  # a system call saved per send
                self.sock.settimeout(self.pdu_timeout)
            self.sock.sendall(data)
        except OSError as error:
            raise PeerGone(str(error) or type(error).__name__) from error

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
