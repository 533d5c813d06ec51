"""A lean C-FIND SCU for the benchmarks, run in its own process: it times the server, not itself.

pynetdicom's SCU decodes every pending response into a Dataset, which costs about as much as
the SCP spends producing it; run beside the SCP it shares the GIL, and in a process of its own
it is still slower than the SCP it measures. This SCU speaks the protocol over a plain socket
(PS3.8 9.3: A-ASSOCIATE, P-DATA-TF, A-RELEASE), encodes each request Identifier once, and reads
each response only as far as the Status of its command set (PS3.7 9.3.2.2).

Reads a JSON list of ``{"name", "matching", "return_keys", "repeat", "warm_up"}`` from stdin and
writes one JSON line per query to stdout: name, matches and the latency of each run in ms
(request sent to final response received), after one untimed run when ``warm_up``.

    python benchmarks/find_scu.py --port 11112 [--called-ae HILUM] < queries.json

Other benchmarks drive it with :func:`find_from_another_process`.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind as FIND,
)

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1
CONTEXT_ID = 1
MAX_PDU = 0  # PS3.8 D.1.1: no limit on the PDUs this SCU receives
IMPLEMENTATION_CLASS_UID = str(PYDICOM_IMPLEMENTATION_UID).encode()
PENDING = (0xFF00, 0xFF01)
STATUS_TAG = b"\x00\x00\x00\x09\x02\x00\x00\x00"  # (0000,0900) US, length 2, implicit VR LE


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(called: str, calling: str, abstract_syntax: str = str(FIND)) -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2): one presentation context (Study Root FIND unless told
    otherwise), implicit VR little endian."""
    context = struct.pack(">BBBB", CONTEXT_ID, 0, 0, 0)
    context += _item(0x30, abstract_syntax.encode())
    context += _item(0x40, IMPLICIT_VR_LITTLE_ENDIAN.encode())
    # PS3.7 D.3.3.2: Maximum Length and Implementation Class UID are both mandatory.
    user = _item(0x51, struct.pack(">I", MAX_PDU)) + _item(0x52, IMPLEMENTATION_CLASS_UID)
    body = struct.pack(">HH", 1, 0)
    body += called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode()) + _item(0x20, context) + _item(0x50, user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (PS3.8 9.3.5, E.2)."""
    pdv = struct.pack(">IBB", len(data) + 2, CONTEXT_ID, control) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def c_find_rq(identifier: Dataset, message_id: int) -> bytes:
    command = Dataset()
    command.AffectedSOPClassUID = FIND
    command.CommandField = 0x0020
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    encoded = encode(command, True, True)
    command.CommandGroupLength = len(encoded)
    encoded = encode(command, True, True)
    return p_data(0x03, encoded) + p_data(0x02, encode(identifier, True, True))


class Connection:
    def __init__(
        self, host: str, port: int, called: str, calling: str, abstract_syntax: str = str(FIND)
    ) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.sock.sendall(associate_rq(called, calling, abstract_syntax))
        pdu_type, _ = self.read_pdu()
        if pdu_type != 0x02:
            raise SystemExit(f"association not accepted (PDU type 0x{pdu_type:02X})")

    def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise SystemExit("the SCP closed the connection")
            self.buffer += chunk
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def read_pdu(self) -> tuple[int, bytes]:
        pdu_type, _, length = struct.unpack(">BBI", self.read_exactly(6))
        return pdu_type, self.read_exactly(length)

    def find(self, request: bytes) -> int:
        """Send one C-FIND-RQ; the number of pending responses up to the final one."""
        self.sock.sendall(request)
        matches = 0
        command = b""
        while True:
            pdu_type, body = self.read_pdu()
            if pdu_type != 0x04:
                raise SystemExit(f"unexpected PDU type 0x{pdu_type:02X} during the C-FIND")
            offset = 0
            while offset < len(body):
                (length,) = struct.unpack_from(">I", body, offset)
                control = body[offset + 5]
                fragment = body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if not control & 1:
                    continue  # a data set fragment: not read
                command += fragment
                if not control & 2:
                    continue
                at = command.index(STATUS_TAG) + len(STATUS_TAG)
                (status,) = struct.unpack_from("<H", command, at)
                command = b""
                if status not in PENDING:
                    return matches
                matches += 1

    def release(self) -> None:
        self.sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))
        self.read_pdu()  # A-RELEASE-RP
        self.sock.close()


def identifier(matching: dict[str, str], return_keys: list[str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in return_keys:
        setattr(ds, keyword, "")
    for keyword, value in matching.items():
        setattr(ds, keyword, value)
    return ds


def find_from_another_process(
    port: int, queries: list[dict[str, Any]], called_ae: str = "HILUM"
) -> list[dict[str, Any]]:
    """Run ``queries`` with this SCU in a subprocess, over one association to ``called_ae``."""
    scu = [sys.executable, str(Path(__file__).resolve()), "--port", str(port)]
    scu += ["--called-ae", called_ae]
    result = subprocess.run(
        scu, input=json.dumps(queries), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"the C-FIND SCU failed against {called_ae}: {result.stderr.strip()}")
    return [json.loads(line) for line in result.stdout.splitlines()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--called-ae", default="HILUM")
    parser.add_argument("--calling-ae", default="BENCH")
    args = parser.parse_args()
    queries: list[dict[str, Any]] = json.load(sys.stdin)
    connection = Connection(args.host, args.port, args.called_ae, args.calling_ae)
    for number, query in enumerate(queries, start=1):
        request = c_find_rq(identifier(query["matching"], query["return_keys"]), number)
        if query.get("warm_up", True):
            connection.find(request)  # warm the caches once
        samples, matches = [], 0
        for _ in range(query["repeat"]):
            start = time.perf_counter()
            matches = connection.find(request)
            samples.append((time.perf_counter() - start) * 1000)
        print(json.dumps({"name": query["name"], "matches": matches, "ms": samples}), flush=True)
    connection.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
