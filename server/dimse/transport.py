"""TCP settings of every DIMSE association, accepted or requested."""

from __future__ import annotations

import socket

from pynetdicom import evt


def disable_nagle(event: evt.Event) -> None:
    """EVT_CONN_OPEN: send each PDU at once (TCP_NODELAY).

    A DIMSE message leaves as a command PDU followed by data set PDUs. With Nagle's algorithm
    the last, small segment waits for the peer's delayed ACK of the previous one (40 ms on
    Linux), so every C-FIND response and every C-STORE sub-operation would stall. DCMTK
    disables Nagle for the same reason.
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
