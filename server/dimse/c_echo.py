"""C-ECHO SCP (PS3.4 Annex A, Verification Service Class)."""

from pynetdicom.events import Event

from server.dimse.statuses import SUCCESS


def handle_c_echo(event: Event) -> int:
    return SUCCESS
