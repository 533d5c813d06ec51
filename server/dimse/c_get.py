"""C-GET SCP (PS3.4 C.4.3): send the matching instances back over the same association.

The SCU proposes storage presentation contexts with SCP/SCU Role Selection (PS3.7 D.3.3.4) so
that Hilum may act as Storage SCU on them; :mod:`server.dimse.ae` accepts that role. pynetdicom
performs each C-STORE sub-operation and counts them in the pending responses, as for C-MOVE.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pynetdicom.events import Event

from config import Settings
from server.dimse.retrieve import RetrieveRefused, plan_retrieve
from server.dimse.storage_scu import sub_operations
from storage.archive import Archive


def handle_c_get(event: Event, archive: Archive, settings: Settings) -> Iterator[Any]:
    try:
        plan = plan_retrieve(event, archive, "C-GET")
    except RetrieveRefused as refusal:
        # pynetdicom accepts a failure only after a count (PS3.4 C.4.3.1.4: A701, A702, A900).
        yield 1
        yield refusal.status, None
        return
    yield plan.number_of_sub_operations
    yield from sub_operations(
        event,
        archive,
        plan,
        None,
        settings.server.data_dir / "tmp",
        settings.server.transcode_max_bytes,
    )
