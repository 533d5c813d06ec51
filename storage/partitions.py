"""The partitions (tenants) of the index: which exist, and creating one.

A partition is a row of the ``partition`` table; every other row of the index carries the name of
its partition, and every query is scoped by it (``Archive.scoped``). ``default`` exists from the
first migration on.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from storage.index.database import Index
from storage.index.models import Partition

# The partition table's key (storage/index/models.py).
MAX_PARTITION_NAME = 64


def partition_exists(index: Index, name: str) -> bool:
    if not name or len(name) > MAX_PARTITION_NAME:
        return False
    with index.read() as session:
        return session.scalar(select(Partition.name).where(Partition.name == name)) is not None


def partition_names(index: Index) -> list[str]:
    """Every partition, by name."""
    with index.read() as session:
        return list(session.scalars(select(Partition.name).order_by(Partition.name)))


def ensure_partition(index: Index, name: str) -> None:
    """Create partition ``name`` unless it exists."""
    if not name or len(name) > MAX_PARTITION_NAME:
        raise ValueError(f"a partition name is 1 to {MAX_PARTITION_NAME} characters: {name!r}")
    insert = postgresql_insert if index.dialect == "postgresql" else sqlite_insert
    with index.write() as session:
        session.execute(insert(Partition).values(name=name).on_conflict_do_nothing())
