"""A lean receiver of C-STORE sub-operations for ``benchmarks/retrieve.py``, run in its own
process: it answers every C-STORE and discards the data set, so that the server sending is
what is timed, not the receiver.

DCMTK's ``storescp --ignore`` and ``getscu --ignore`` still take each PDU apart into a DIMSE
message, one C-STORE outstanding at a time. This receiver speaks the protocol over a plain
socket (PS3.8 9.3: A-ASSOCIATE, P-DATA-TF, A-RELEASE), reads each PDV's header and skips its
bytes (``readinto`` one scratch buffer), and reads only the few command elements it answers.
Two roles:

* ``serve``: a Storage SCP (the Move Destination of a C-MOVE), one forked process per
  association; it accepts every proposed context, explicit VR little endian when proposed, and
  writes ``Received Store Request`` to stdout for each C-STORE it answers (as ``storescp -v``).
* ``get``: a C-GET SCU (Study Root) that takes the Storage SCP role for CT Image Storage
  (PS3.7 D.3.3.4) and prints the final response's ``Completed Suboperations : N`` (as ``getscu
  -v``) and when it requested the association and ended (``time.monotonic``, the same clock
  in every process), so that the interpreter's start (~40 ms) is not timed. ``--uids`` asks
  for a list of SOP Instance UIDs at IMAGE level instead of the study.

Both print, at the end of each association, the median time from one C-STORE-RSP to the next
(``C-STORE cycle median N us over M``): what one sub-operation costs, the sender's turnaround
included; a median, so that the moments this process or the sender lost its core on a loaded
machine do not count, as they do in a rate.

Both advertise ``--max-pdu`` (default 131072, the largest that DCMTK's tools take) as their
Maximum Length Received and set TCP_NODELAY.

    python benchmarks/discard_store.py serve --port 11113 [--ae LEAN] [--max-pdu 131072]
    python benchmarks/discard_store.py get --port 11112 --called-ae HILUM --study UID
        [--series UID --uids UID\\UID...] [--max-pdu 131072]
"""

from __future__ import annotations

import argparse
import os
import socket
import socketserver
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"
EXPLICIT_VR_LE = b"1.2.840.10008.1.2.1"
STUDY_ROOT_GET = b"1.2.840.10008.5.1.4.1.2.2.3"
CT_IMAGE_STORAGE = b"1.2.840.10008.5.1.4.1.1.2"
IMPLEMENTATION_CLASS_UID = b"1.2.826.0.1.3680043.9.7156.1.15"  # Hilum's benchmarks
C_STORE_RQ, C_STORE_RSP, C_GET_RQ, C_GET_RSP = 0x0001, 0x8001, 0x0010, 0x8010
PENDING = (0xFF00, 0xFF01)
NO_DATA_SET = 0x0101
COMMAND, LAST = 0x01, 0x02  # PS3.8 E.2: the message control header's bits


class PeerGone(Exception):
    pass


# --- PDUs and command sets ------------------------------------------------------------------


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def user_information(max_pdu: int, *extra: bytes) -> bytes:
    # PS3.7 D.3.3.1-2: Maximum Length and Implementation Class UID are both mandatory.
    return item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, IMPLEMENTATION_CLASS_UID)
                + b"".join(extra))  # fmt: skip


def uid(value: bytes) -> bytes:
    return value + b"\0" if len(value) % 2 else value


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set in implicit VR little endian (PS3.7 6.3.1), its group length first."""
    body = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def command_elements(encoded: bytes) -> dict[int, bytes]:
    """Group 0000's elements of an implicit VR command set: element number -> value."""
    elements, offset = {}, 0
    while offset + 8 <= len(encoded):
        _, element, length = struct.unpack_from("<HHI", encoded, offset)
        elements[element] = encoded[offset + 8 : offset + 8 + length]
        offset += 8 + length
    return elements


def us(value: bytes) -> int:
    return struct.unpack("<H", value[:2])[0]


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    return pdu(0x04, struct.pack(">IBB", len(data) + 2, context_id, control) + data)


# --- one association ------------------------------------------------------------------------


class Link:
    """The association's socket: PDUs in through a buffered reader, PDV data skipped."""

    def __init__(self, sock: socket.socket, max_pdu: int) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.reader: BinaryIO = sock.makefile("rb", buffering=1 << 18)
        self.scratch = memoryview(bytearray(max(max_pdu, 1 << 16)))

    def read(self, size: int) -> bytes:
        data = self.reader.read(size)
        if len(data) < size:
            raise PeerGone("the peer closed the connection")
        return data

    def skip(self, size: int) -> None:
        while size:
            got = self.reader.readinto(self.scratch[: min(size, len(self.scratch))])
            if not got:
                raise PeerGone("the peer closed the connection")
            size -= got

    def read_pdu_header(self) -> tuple[int, int]:
        pdu_type, _, length = struct.unpack(">BBI", self.read(6))
        return pdu_type, length

    def events(self) -> Iterator[tuple[int, bytes]]:
        """(context ID, command bytes) for each complete command and each data set's
        last fragment (empty bytes); ends at A-RELEASE-RQ (answered) or A-ABORT."""
        command = b""
        while True:
            pdu_type, length = self.read_pdu_header()
            if pdu_type != 0x04:
                if pdu_type == 0x05:  # A-RELEASE-RQ: answer it
                    self.skip(length)
                    self.sock.sendall(pdu(0x06, bytes(4)))
                return
            while length:
                pdv_length, context_id, control = struct.unpack(">IBB", self.read(6))
                length -= 4 + pdv_length
                if control & COMMAND:
                    command += self.read(pdv_length - 2)
                    if control & LAST:
                        yield context_id, command
                        command = b""
                else:
                    self.skip(pdv_length - 2)
                    if control & LAST:
                        yield context_id, b""


def store_response(context_id: int, request: dict[int, bytes]) -> bytes:
    """C-STORE-RSP, Success (PS3.7 9.3.1.2)."""
    return p_data(context_id, COMMAND | LAST, command_set([
        (0x0002, request[0x0002]),
        (0x0100, struct.pack("<H", C_STORE_RSP)),
        (0x0120, request[0x0110]),
        (0x0800, struct.pack("<H", NO_DATA_SET)),
        (0x0900, struct.pack("<H", 0)),
        (0x1000, request[0x1000]),
    ]))  # fmt: skip


def answer_stores(
    link: Link, on_stored: Callable[[], None] | None = None, answered: list[float] | None = None
) -> Iterator[tuple[int, dict[int, bytes]]]:
    """Answer every C-STORE-RQ once its data set has arrived; yield the other commands.
    ``answered``: when each C-STORE-RSP was sent (``time.monotonic``)."""
    storing: tuple[int, dict[int, bytes]] | None = None
    for context_id, command in link.events():
        if command:
            elements = command_elements(command)
            if us(elements[0x0100]) == C_STORE_RQ:
                storing = context_id, elements
            else:
                yield context_id, elements
        elif storing is not None:
            link.sock.sendall(store_response(*storing))
            if answered is not None:
                answered.append(time.monotonic())
            if on_stored is not None:
                on_stored()
            storing = None


def cycle_line(answered: list[float]) -> str:
    cycles = [later - earlier for earlier, later in zip(answered, answered[1:], strict=False)]
    median = statistics.median(cycles) if cycles else 0.0
    return f"C-STORE cycle median {median * 1e6:.0f} us over {len(cycles)}\n"


# --- serve: the Move Destination ------------------------------------------------------------


def associate_ac(request: bytes, max_pdu: int) -> bytes:
    """A-ASSOCIATE-AC for an A-ASSOCIATE-RQ's body: every context accepted (PS3.8 9.3.3)."""
    accepted = []
    offset = 68
    while offset < len(request):
        item_type, _, length = struct.unpack_from(">BBH", request, offset)
        value = request[offset + 4 : offset + 4 + length]
        offset += 4 + length
        if item_type != 0x20:
            continue
        context_id, syntaxes, at = value[0], [], 4
        while at < len(value):
            sub_type, _, sub_length = struct.unpack_from(">BBH", value, at)
            if sub_type == 0x40:
                syntaxes.append(value[at + 4 : at + 4 + sub_length].rstrip(b"\0"))
            at += 4 + sub_length
        chosen = EXPLICIT_VR_LE if EXPLICIT_VR_LE in syntaxes else syntaxes[0]
        accepted.append(item(0x21, bytes([context_id, 0, 0, 0]) + item(0x40, chosen)))
    body = request[:68] + item(0x10, APPLICATION_CONTEXT) + b"".join(accepted)
    return pdu(0x02, body + user_information(max_pdu))


def serve(port: int, max_pdu: int) -> None:
    def stored() -> None:
        os.write(1, b"Received Store Request\n")

    class Association(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            link = Link(self.request, max_pdu)
            answered: list[float] = []
            try:
                pdu_type, length = link.read_pdu_header()
                if pdu_type != 0x01:
                    return
                link.sock.sendall(associate_ac(link.read(length), max_pdu))
                for _ in answer_stores(link, stored, answered):
                    pass  # no other request is answered
            except PeerGone:
                pass
            if answered:
                os.write(1, cycle_line(answered).encode())

    class Server(socketserver.ForkingTCPServer):
        allow_reuse_address = True
        request_queue_size = 64

    with Server(("127.0.0.1", port), Association) as server:
        server.serve_forever()


# --- get: the C-GET SCU ---------------------------------------------------------------------


def associate_rq(called: str, calling: str, max_pdu: int) -> bytes:
    """Context 1: Study Root GET; context 3: CT Image Storage (explicit, then implicit VR LE),
    with the SCP role for this SCU (PS3.7 D.3.3.4)."""
    get = item(0x30, STUDY_ROOT_GET) + item(0x40, IMPLICIT_VR_LE)
    store = item(0x30, CT_IMAGE_STORAGE) + item(0x40, EXPLICIT_VR_LE) + item(0x40, IMPLICIT_VR_LE)
    role = item(0x54, struct.pack(">H", len(CT_IMAGE_STORAGE)) + CT_IMAGE_STORAGE + b"\x00\x01")
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
    body += bytes(32) + item(0x10, APPLICATION_CONTEXT)
    body += item(0x20, bytes([1, 0, 0, 0]) + get) + item(0x20, bytes([3, 0, 0, 0]) + store)
    return pdu(0x01, body + user_information(max_pdu, role))


def identifier(study: str, series: str, uids: str) -> bytes:
    """The C-GET Identifier in implicit VR little endian (PS3.4 C.4.3.1.3): the study, or a
    list of its instances with the unique keys of the levels above (PS3.4 C.4.3.2.1)."""
    level = b"IMAGE " if uids else b"STUDY "
    elements = [((0x0008, 0x0052), level), ((0x0020, 0x000D), uid(study.encode()))]
    if uids:
        elements.append(((0x0020, 0x000E), uid(series.encode())))
        elements.append(((0x0008, 0x0018), uid(uids.encode())))
    elements.sort()
    return b"".join(struct.pack("<HHI", g, e, len(v)) + v for (g, e), v in elements)


def get(
    port: int, called: str, calling: str, study: str, series: str, uids: str, max_pdu: int
) -> int:
    started = time.monotonic()
    link = Link(socket.create_connection(("127.0.0.1", port)), max_pdu)
    link.sock.sendall(associate_rq(called, calling, max_pdu))
    pdu_type, length = link.read_pdu_header()
    link.read(length)
    if pdu_type != 0x02:
        print(f"association not accepted (PDU type 0x{pdu_type:02X})")
        return 1
    request = command_set([
        (0x0002, uid(STUDY_ROOT_GET)),
        (0x0100, struct.pack("<H", C_GET_RQ)),
        (0x0110, struct.pack("<H", 1)),
        (0x0700, struct.pack("<H", 0)),
        (0x0800, struct.pack("<H", 0)),
    ])  # fmt: skip
    link.sock.sendall(
        p_data(1, COMMAND | LAST, request) + p_data(1, LAST, identifier(study, series, uids))
    )
    answered: list[float] = []
    for _, elements in answer_stores(link, answered=answered):
        if us(elements[0x0100]) != C_GET_RSP:
            continue
        status = us(elements[0x0900])
        if status in PENDING:
            continue
        completed = us(elements.get(0x1021, b"\0\0"))
        print(f"Final Get Response: status 0x{status:04X}")
        print(f"Number of Completed Suboperations : {completed}", flush=True)
        link.sock.sendall(pdu(0x05, bytes(4)))  # A-RELEASE-RQ
        while True:  # a data set of the final response, then A-RELEASE-RP
            pdu_type, length = link.read_pdu_header()
            link.skip(length)
            if pdu_type != 0x04:
                # CLOCK_MONOTONIC, the same for every process: the caller times the clients
                # from the first association request, without the interpreter's start.
                ended = time.monotonic()
                print(cycle_line(answered), end="")
                print(f"Monotonic from {started:.6f} to {ended:.6f}")
                return 0 if status == 0 else 2
    print("the association ended before the final C-GET response")
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("serve", "get"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-pdu", type=int, default=131072)
    parser.add_argument("--called-ae", default="HILUM")
    parser.add_argument("--calling-ae", default="BENCH")
    parser.add_argument("--study", default="")
    parser.add_argument("--series", default="", help="with --uids: their series")
    parser.add_argument("--uids", default="", help="SOP Instance UIDs, \\-separated")
    args = parser.parse_args()
    if args.role == "serve":
        serve(args.port, args.max_pdu)
        return 0
    try:
        return get(args.port, args.called_ae, args.calling_ae, args.study, args.series,
                   args.uids, args.max_pdu)  # fmt: skip
    except PeerGone as error:
        print(f"C-GET failed: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
