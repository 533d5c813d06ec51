"""TCP settings of every DIMSE association, accepted or requested."""

from __future__ import annotations

import socket

from pynetdicom import evt
from pynetdicom.association import Association


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


def keep_alive(assoc: Association) -> None:
    """Mark ``assoc`` busy while Hilum sends on it (C-FIND responses, C-MOVE / C-GET
    sub-operations).

    pynetdicom's idle timer (``[dimse] network_timeout_s``) counts from the last PDU received,
    and is checked once the request is answered: a C-FIND or C-MOVE that took the SCP longer
    than the timeout to answer would have its association aborted right after the answer.
    """
    idle_timer = getattr(assoc.dul, "_idle_timer", None)  # pynetdicom 3: DUL's ARTIM-like timer
    if idle_timer is not None:
        idle_timer.restart()


def acknowledge_at_once(event: evt.Event) -> None:
    """EVT_DATA_SENT: acknowledge the peer's answer at once (TCP_QUICKACK, Linux), for the
    C-STORE sub-operations of C-MOVE (Hilum's association to the destination) and C-GET (the
    SCU's own association).

    Many peers (DCMTK unless ``TCP_NODELAY`` is set in its environment) write a C-STORE response
    in two small writes under Nagle's algorithm: the second waits for Hilum's ACK of the first,
    which a delayed ACK holds back 40 ms, so every sub-operation would wait 40 ms. Quick-ACK mode
    is not sticky, hence after every send.
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if sock is not None and quickack is not None:
        sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
