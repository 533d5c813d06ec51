"""DIMSE AE permissions: what each calling AE title may do, in which partition, from where.

One row per (calling AE title, partition): store (C-STORE), query (C-FIND), retrieve (C-MOVE,
C-GET), and the CIDR networks the association may come from (none: any). The association
policy (``server.dimse.ae``) reads what it needs once per association with
:func:`association_policy`; a change applies to the associations that start after it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import delete, exists, select

from config.settings import check_network
from storage.errors import InvalidArgument, NotFound
from storage.index.database import Index, affected_rows
from storage.index.models import DEFAULT_PARTITION, AEPermission, Partition, PartitionAETitle
from storage.partitions import ae_title, partition_name


@dataclass(frozen=True)
class AEPermissionEntry:
    calling_ae_title: str
    partition: str
    store: bool
    query: bool
    retrieve: bool
    networks: tuple[str, ...] = ()  # CIDR; empty: any address

    def allows_address(self, address: str) -> bool:
        """Whether an association from ``address`` (an IP address) may use this permission."""
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.1.2.3 on a dual-stack socket
        return any(ip in ipaddress.ip_network(network) for network in self.networks)

    @property
    def services(self) -> str:
        named = [n for n, on in (("store", self.store), ("query", self.query),
                                 ("retrieve", self.retrieve)) if on]  # fmt: skip
        return ",".join(named) or "echo only"  # C-ECHO needs no permission of its own


def networks(values: Iterable[str]) -> tuple[str, ...]:
    """CIDR networks, canonical; raise :class:`InvalidArgument`."""
    try:
        return tuple(dict.fromkeys(check_network(value) for value in values))
    except ValueError as error:
        raise InvalidArgument(str(error)) from None


def _entry(row: AEPermission) -> AEPermissionEntry:
    return AEPermissionEntry(
        row.calling_ae_title, row.partition, row.store, row.query, row.retrieve,
        tuple(row.networks or ()),
    )  # fmt: skip


def set_ae_permission(index: Index, entry: AEPermissionEntry) -> bool:
    """Add or replace the permission of (calling AE title, partition); True if added."""
    title = ae_title(entry.calling_ae_title)
    partition = partition_name(entry.partition)
    allowed_networks = list(networks(entry.networks))
    with index.write() as session:
        if session.get(Partition, partition) is None:
            raise NotFound(f"no partition {partition}: create it first (hilum partitions create)")
        row = session.get(AEPermission, (title, partition))
        added = row is None
        if row is None:
            row = AEPermission(calling_ae_title=title, partition=partition)
            session.add(row)
        row.store, row.query, row.retrieve = entry.store, entry.query, entry.retrieve
        row.networks = allowed_networks
    return added


def remove_ae_permission(index: Index, calling_ae_title: str, partition: str | None) -> int:
    """Remove the permissions of ``calling_ae_title`` (in ``partition``, or in every
    partition); the number removed. Raise :class:`NotFound` when there was none."""
    statement = delete(AEPermission).where(AEPermission.calling_ae_title == calling_ae_title)
    if partition is not None:
        statement = statement.where(AEPermission.partition == partition)
    with index.write() as session:
        removed = affected_rows(session, statement)
    if not removed:
        where = f" in partition {partition}" if partition is not None else ""
        raise NotFound(f"no AE permission for {calling_ae_title}{where}")
    return int(removed)


def list_ae_permissions(index: Index) -> list[AEPermissionEntry]:
    with index.read() as session:
        rows = session.scalars(
            select(AEPermission).order_by(AEPermission.calling_ae_title, AEPermission.partition)
        ).all()
        return [_entry(row) for row in rows]


@dataclass(frozen=True)
class AssociationPolicy:
    """What the index says about one association request, read in one transaction."""

    # The partition the Called AE Title selects: "default" for [dimse] ae_title, a stored
    # partition AE title's partition, or None for an unknown title.
    partition: str | None
    # The calling AE's permission in that partition, if any.
    permission: AEPermissionEntry | None
    # Whether any AE permission is stored: then an AE without one is not recognised.
    restricted: bool


def association_policy(
    index: Index,
    calling_ae_title: str,
    called_ae_title: str,
    *,
    default_ae_title: str,
    unknown_called_is_default: bool,
) -> AssociationPolicy:
    """The partition of ``called_ae_title`` and the permission of ``calling_ae_title`` in it
    (``default_ae_title``: ``[dimse] ae_title``, the default partition's;
    ``unknown_called_is_default``: an unknown called AE title selects the default partition)."""
    with index.read() as session:
        if called_ae_title == default_ae_title:
            partition: str | None = DEFAULT_PARTITION
        else:
            partition = session.scalar(
                select(PartitionAETitle.partition).where(
                    PartitionAETitle.ae_title == called_ae_title
                )
            )
            if partition is None and unknown_called_is_default:
                partition = DEFAULT_PARTITION
        restricted = bool(session.scalar(select(exists().select_from(AEPermission))))
        row = (
            session.get(AEPermission, (calling_ae_title, partition))
            if restricted and partition is not None
            else None
        )
        return AssociationPolicy(partition, _entry(row) if row else None, restricted)


def any_ae_permissions(index: Index) -> bool:
    with index.read() as session:
        return bool(session.scalar(select(exists().select_from(AEPermission))))
