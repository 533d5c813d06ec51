"""C-GET SCP (PS3.4 C.4.3): send the matching instances back over the same association.

The SCU proposes storage presentation contexts with SCP/SCU Role Selection (PS3.7 D.3.3.4) so
that Hilum may act as Storage SCU on them; :mod:`server.dimse.server` accepts that role.
"""

from __future__ import annotations

from config import Settings
from server.dimse.association import Association, Message
from server.dimse.commands import CommandField
from server.dimse.retrieve import (
    RetrieveRefused,
    RetrieveResponses,
    perform_sub_operations,
    plan_retrieve,
)
from storage.archive import Archive


def handle_c_get(
    assoc: Association, message: Message, archive: Archive, settings: Settings
) -> None:
    try:
        plan = plan_retrieve(assoc, message, archive, "C-GET")
    except RetrieveRefused as refusal:
        # PS3.4 C.4.3.1.4: A701, A702, A900, answered at once.
        RetrieveResponses(assoc, message, CommandField.C_GET_RSP).refuse(
            refusal.status, refusal.comment
        )
        return
    perform_sub_operations(assoc, message, plan, assoc, archive, settings, "C-GET")
