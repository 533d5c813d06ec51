"""Partitions (tenants) and the Called AE Titles that select them over DIMSE.

The ``partition`` column of every index table is the isolation boundary; this module creates
partitions and maps AE titles to them. ``[dimse] ae_title`` is the default partition's AE title
and is not stored; every other partition is reached over DIMSE through its own AE titles, each
belonging to one partition.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select

from config.settings import check_ae_title, check_partition_name
from storage.errors import Conflict, InvalidArgument, NotFound
from storage.index.database import Index
from storage.index.models import Partition, PartitionAETitle


@dataclass(frozen=True)
class PartitionEntry:
    name: str
    ae_titles: tuple[str, ...]  # stored ones; the default partition's is [dimse] ae_title


def partition_name(value: str) -> str:
    """``value`` if it is a valid partition name; raise :class:`InvalidArgument`."""
    try:
        return check_partition_name(value)
    except ValueError as error:
        raise InvalidArgument(str(error)) from None


def ae_title(value: str) -> str:
    """``value`` (surrounding spaces removed) if it is a valid AE title (PS3.5 6.2: 1-16
    characters of the default repertoire, no backslash or control character, not all
    spaces); raise :class:`InvalidArgument`."""
    try:
        return check_ae_title(value)
    except ValueError as error:
        raise InvalidArgument(str(error)) from None


def create_partition(
    index: Index, name: str, ae_titles: Iterable[str], *, reserved_ae_title: str
) -> PartitionEntry:
    """A new partition reached over DIMSE by ``ae_titles`` (Called AE Titles not used by
    another partition, and not ``reserved_ae_title``: ``[dimse] ae_title``)."""
    name = partition_name(name)
    titles = tuple(dict.fromkeys(ae_title(title) for title in ae_titles))
    if reserved_ae_title in titles:
        raise Conflict(f"{reserved_ae_title} is [dimse] ae_title, the default partition's")
    with index.write() as session:
        if session.get(Partition, name) is not None:
            raise Conflict(f"partition {name} already exists")
        taken = session.scalars(
            select(PartitionAETitle).where(PartitionAETitle.ae_title.in_(titles))
        ).all()
        if taken:
            used = ", ".join(f"{row.ae_title} ({row.partition})" for row in taken)
            raise Conflict(f"AE title(s) already used by another partition: {used}")
        session.add(Partition(name=name))
        session.flush()  # the partition row first: the AE titles refer to it
        session.add_all(PartitionAETitle(ae_title=title, partition=name) for title in titles)
    return PartitionEntry(name, titles)


def add_partition_ae_title(index: Index, name: str, title: str, *, reserved_ae_title: str) -> None:
    """Give partition ``name`` one more Called AE Title (not used by another partition)."""
    title = ae_title(title)
    if title == reserved_ae_title:
        raise Conflict(f"{title} is [dimse] ae_title, the default partition's")
    with index.write() as session:
        if session.get(Partition, name) is None:
            raise NotFound(f"no partition {name}")
        taken = session.get(PartitionAETitle, title)
        if taken is not None:
            raise Conflict(f"AE title {title} is already partition {taken.partition}'s")
        session.add(PartitionAETitle(ae_title=title, partition=name))


def remove_partition_ae_title(index: Index, name: str, title: str) -> None:
    """Partition ``name`` no longer reached through ``title`` (its data stays)."""
    with index.write() as session:
        row = session.get(PartitionAETitle, title)
        if row is None or row.partition != name:
            raise NotFound(f"partition {name} has no AE title {title}")
        session.delete(row)


def list_partitions(index: Index) -> list[PartitionEntry]:
    with index.read() as session:
        names = session.scalars(select(Partition.name).order_by(Partition.name)).all()
        rows = session.execute(
            select(PartitionAETitle.partition, PartitionAETitle.ae_title).order_by(
                PartitionAETitle.ae_title
            )
        ).all()
    titles: dict[str, list[str]] = {name: [] for name in names}
    for partition, title in rows:
        titles[partition].append(title)
    return [PartitionEntry(name, tuple(titles[name])) for name in names]


def partition_exists(index: Index, name: str) -> bool:
    """Whether partition ``name`` exists (the HTTP routing of /partitions/{name}/…)."""
    with index.read() as session:
        return session.get(Partition, name) is not None


def partition_names(index: Index) -> list[str]:
    """Every partition, by name."""
    with index.read() as session:
        return list(session.scalars(select(Partition.name).order_by(Partition.name)))
