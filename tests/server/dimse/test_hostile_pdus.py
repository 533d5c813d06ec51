"""Malformed and hostile input on a raw socket (PS3.8 9): every case ends in an A-ABORT or a
refusal within a bounded time, holds no memory in proportion to what the peer announced, and
the server keeps answering C-ECHO on other associations."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from server.dimse.ae import DimseServer
from server.dimse.commands import CommandField, encode_command
from storage.archive import open_archive
from tests.conftest import make_settings
from tests.factories import ct_instance, write_part10
from tests.server.dimse.scu import echo_works, send_file_raw
from tests.waiting import wait_until

NETWORK_TIMEOUT_S = 2.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DimseServer]:
    settings = make_settings(
        tmp_path, dimse={"network_timeout_s": NETWORK_TIMEOUT_S, "max_pdu_length": 16384}
    )
    archive = open_archive(settings, migrate=True)
    dimse = DimseServer(settings, archive)
    dimse.start()
    try:
        yield dimse
    finally:
        dimse.stop()
        archive.close()


def association_request(called: str = "HILUM") -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID("1.2.840.10008.3.1.1.1")
    primitive.calling_ae_title, primitive.called_ae_title = "HOSTILE", called
    contexts = []
    for n, abstract in enumerate([Verification, CTImageStorage]):
        context = build_context(abstract, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        context.context_id = 2 * n + 1
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = UID("1.2.3.4")
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def connect(server: DimseServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def associated(server: DimseServer) -> socket.socket:
    sock = connect(server)
    sock.sendall(association_request())
    pdu_type, length = read_pdu_header(sock)
    assert pdu_type == 0x02, "A-ASSOCIATE-AC"
    read_exact(sock, length)
    return sock


def read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def read_pdu_header(sock: socket.socket) -> tuple[int, int]:
    pdu_type, _, length = struct.unpack(">BBI", read_exact(sock, 6))
    return pdu_type, length


def ends_in_abort(sock: socket.socket, within_s: float = 10.0) -> tuple[bool, float]:
    """Whether the server sent an A-ABORT (or simply closed) and how long it took."""
    started = time.monotonic()
    sock.settimeout(within_s)
    try:
        pdu_type, length = read_pdu_header(sock)
        read_exact(sock, length)
        aborted = pdu_type == 0x07
        closed = sock.recv(1) == b""  # and then it closes the connection
        return aborted and closed, time.monotonic() - started
    except ConnectionError:
        return True, time.monotonic() - started  # closed without an A-ABORT
    finally:
        sock.close()


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">BBIIBB", 0x04, 0, len(data) + 6, len(data) + 2, context_id, control) + data


BEFORE_ASSOCIATION = {
    "huge-association-rq": b"\x01\x00" + struct.pack(">I", 0xFFFFFFF0) + b"\x00" * 64,
    "p-data-before-association": p_data(1, 0x03, b"\x00" * 8),
    "unknown-pdu-type": b"\x09\x00\x00\x00\x00\x04" + b"\x00" * 4,
    "garbage-association-rq": b"\x01\x00\x00\x00\x00\x10" + b"\xff" * 16,
}


@pytest.mark.parametrize("data", BEFORE_ASSOCIATION.values(), ids=BEFORE_ASSOCIATION)
def test_hostile_first_pdu_is_aborted(server: DimseServer, data: bytes) -> None:
    sock = connect(server)
    sock.sendall(data)
    aborted, seconds = ends_in_abort(sock)
    assert aborted and seconds < 5
    assert echo_works(server)


ON_ASSOCIATION = {
    # PS3.8 D.1.1: longer than the 16384 bytes Hilum offered.
    "p-data-longer-than-offered": b"\x04\x00" + struct.pack(">I", 0xFFFFFFF0) + b"\x00" * 64,
    "pdv-for-unaccepted-context": p_data(99, 0x03, b"\x00" * 8),
    "pdv-longer-than-its-pdu": b"\x04\x00\x00\x00\x00\x08\x00\x00\x01\x00\x01\x03\x00\x00",
    "data-set-before-command": p_data(1, 0x02, b"\x00" * 8),
    "unknown-pdu-type": b"\x0a\x00\x00\x00\x00\x04" + b"\x00" * 4,
    "malformed-command-set": p_data(1, 0x03, b"\x00\x00\x00\x01\xff\xff\x00\x00"),
    # A command fragment without the last-fragment flag, then a release mid-message.
    "release-inside-a-message": p_data(1, 0x01, b"\x00" * 8)
    + b"\x05\x00\x00\x00\x00\x04"
    + bytes(4),
}


@pytest.mark.parametrize("data", ON_ASSOCIATION.values(), ids=ON_ASSOCIATION)
def test_hostile_pdu_on_an_association_is_aborted(server: DimseServer, data: bytes) -> None:
    sock = associated(server)
    sock.sendall(data)
    aborted, seconds = ends_in_abort(sock)
    assert aborted and seconds < 5
    assert echo_works(server)


@pytest.mark.parametrize("cut_after", [3, 20], ids=["in-pdu-header", "in-pdu-body"])
def test_truncated_pdu_then_close_leaves_the_server_serving(
    server: DimseServer, cut_after: int
) -> None:
    sock = associated(server)
    sock.sendall(p_data(1, 0x03, b"\x00" * 100)[:cut_after])
    sock.close()
    assert echo_works(server)


def test_fragments_that_never_end_are_aborted_at_the_idle_timeout(server: DimseServer) -> None:
    """Command fragments without the last-fragment flag, then silence."""
    sock = associated(server)
    sock.sendall(p_data(1, 0x01, b"\x00" * 8))
    aborted, seconds = ends_in_abort(sock, within_s=NETWORK_TIMEOUT_S * 5)
    assert aborted and NETWORK_TIMEOUT_S * 0.5 < seconds < NETWORK_TIMEOUT_S * 3
    assert echo_works(server)


def test_a_peer_trickling_one_byte_at_a_time_is_cut_off(server: DimseServer) -> None:
    """Every byte arrives before the idle timeout, but the PDU does not arrive whole within
    ``network_timeout_s`` of its first byte: the connection ends, and others are served
    meanwhile."""
    sock = connect(server)
    request = association_request()
    started = time.monotonic()
    closed = threading.Event()

    def trickle() -> None:
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                if closed.wait(NETWORK_TIMEOUT_S / 4):
                    return
        except OSError:
            closed.set()

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    served_meanwhile = echo_works(server)
    aborted, _ = ends_in_abort(sock, within_s=NETWORK_TIMEOUT_S * 5)
    elapsed = time.monotonic() - started
    closed.set()
    sender.join(10)
    assert served_meanwhile
    assert aborted and elapsed < NETWORK_TIMEOUT_S * 3
    assert len(request) > 20  # it would have taken far longer to send whole


def test_memory_does_not_follow_the_instance_size(server: DimseServer, tmp_path: Path) -> None:
    """A 32 MiB data set streams through a fixed buffer: the Python heap of the SCP grows by
    far less than the instance (tracemalloc; the SCU reads its file in PDU-sized pieces)."""
    path = write_part10(ct_instance(size=4096), tmp_path / "large.dcm")
    assert path.stat().st_size > 32 << 20
    tracemalloc.start()
    try:
        status = send_file_raw(server, path, CTImageStorage, ExplicitVRLittleEndian)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert int(status.Status) == 0x0000
    assert peak < 4 << 20, f"peak Python heap {peak >> 20} MiB"


def test_a_data_set_cut_short_leaves_no_temporary_file(server: DimseServer) -> None:
    """A C-STORE whose data set never ends (the peer vanishes): its partial file is removed
    when the association ends, not an hour later."""
    command = encode_command(
        {
            "AffectedSOPClassUID": CTImageStorage,
            "CommandField": CommandField.C_STORE_RQ,
            "MessageID": 1,
            "Priority": 0,
            "CommandDataSetType": 0,
            "AffectedSOPInstanceUID": "1.2.3.4",
        }
    )
    sock = associated(server)
    sock.sendall(p_data(3, 0x03, command) + p_data(3, 0x00, b"\x08\x00" * 2000))
    wait_until(lambda: list(server.tmp_dir.glob("tmp*.dcm")), "the data set received", 10)
    sock.close()
    wait_until(lambda: not list(server.tmp_dir.glob("tmp*.dcm")), "the partial file removed", 10)
    assert echo_works(server)


def test_a_data_set_over_the_size_limit_is_refused_as_it_arrives(tmp_path: Path) -> None:
    """``[limits] instance_max_bytes`` is checked while the data set arrives: the rest is read
    and dropped (nothing grows on disk), the request answered 0xA700 naming the limit, and the
    association goes on."""
    settings = make_settings(tmp_path, limits={"instance_max_bytes": 100_000})
    archive = open_archive(settings, migrate=True)
    server = DimseServer(settings, archive)
    server.start()
    try:
        large = write_part10(ct_instance(size=512), tmp_path / "large.dcm")
        small = write_part10(ct_instance(size=32), tmp_path / "small.dcm")
        refused = send_file_raw(server, large, CTImageStorage, ExplicitVRLittleEndian)
        stored = send_file_raw(server, small, CTImageStorage, ExplicitVRLittleEndian)
        assert int(refused.Status) == 0xA700
        assert str(refused.ErrorComment).startswith("over limits.instance_max_bytes")
        assert int(stored.Status) == 0x0000
        assert list(server.tmp_dir.glob("tmp*.dcm")) == []
    finally:
        server.stop()
        archive.close()


def test_a_message_trickled_in_tiny_pdus_is_aborted(server: DimseServer) -> None:
    """Each PDU arrives whole and in time (one empty command fragment every quarter of the
    timeout), so neither the idle nor the PDU timer fires; the message itself does not
    progress, and the association is aborted soon after ``network_timeout_s``."""
    sock = associated(server)
    started = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        with contextlib.suppress(OSError):
            while not stop.wait(NETWORK_TIMEOUT_S / 4):
                sock.sendall(p_data(1, 0x01, b""))

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    aborted, _ = ends_in_abort(sock, within_s=NETWORK_TIMEOUT_S * 6)
    elapsed = time.monotonic() - started
    stop.set()
    sender.join(10)
    assert aborted and NETWORK_TIMEOUT_S < elapsed < NETWORK_TIMEOUT_S * 3
    assert echo_works(server)
