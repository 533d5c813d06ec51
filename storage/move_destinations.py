"""C-MOVE destinations (PS3.4 C.4.2.1.2, Move Destination): the AE titles C-MOVE may send to,
stored in the index so that administrators change them without a restart (``hilum peers``).
``[[dimse.peers]]`` in the settings file is copied here on first start."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select

from storage.errors import InvalidArgument, NotFound
from storage.index.database import Index, affected_rows
from storage.index.models import MoveDestination
from storage.partitions import ae_title


@dataclass(frozen=True)
class MoveDestinationEntry:
    ae_title: str
    host: str
    port: int
    tls: bool = False  # DICOM TLS, with [dimse] tls_* as Hilum's identity


def set_move_destination(index: Index, entry: MoveDestinationEntry) -> bool:
    """Add or replace the destination called ``entry.ae_title``; True if added."""
    title = ae_title(entry.ae_title)
    if not entry.host.strip() or len(entry.host) > 255:
        raise InvalidArgument(f"{entry.host!r} is not a host name or address")
    if not 1 <= entry.port <= 65535:
        raise InvalidArgument(f"port {entry.port} is not between 1 and 65535")
    with index.write() as session:
        row = session.get(MoveDestination, title)
        added = row is None
        if row is None:
            row = MoveDestination(ae_title=title)
            session.add(row)
        row.host, row.port, row.tls = entry.host.strip(), entry.port, entry.tls
    return added


def remove_move_destination(index: Index, title: str) -> None:
    with index.write() as session:
        removed = affected_rows(
            session, delete(MoveDestination).where(MoveDestination.ae_title == title)
        )
    if not removed:
        raise NotFound(f"no move destination {title}")


def list_move_destinations(index: Index) -> list[MoveDestinationEntry]:
    with index.read() as session:
        rows = session.scalars(select(MoveDestination).order_by(MoveDestination.ae_title)).all()
        return [MoveDestinationEntry(r.ae_title, r.host, r.port, r.tls) for r in rows]


def find_move_destination(index: Index, title: str) -> MoveDestinationEntry | None:
    """The destination called ``title`` (trailing spaces ignored), if known."""
    with index.read() as session:
        row = session.get(MoveDestination, title.strip())
        return MoveDestinationEntry(row.ae_title, row.host, row.port, row.tls) if row else None
