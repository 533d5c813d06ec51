"""Partitions, their AE titles and AE permissions in the index (SQLite; the DIMSE tests run
them over the wire and on PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.ae_permissions import (
    AEPermissionEntry,
    AssociationPolicy,
    association_policy,
    list_ae_permissions,
    set_ae_permission,
)
from storage.archive import Archive, open_archive
from storage.errors import Conflict, InvalidArgument
from storage.partitions import create_partition, list_partitions, partition_exists
from tests.conftest import make_settings


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    archive = open_archive(make_settings(tmp_path), migrate=True)
    try:
        yield archive
    finally:
        archive.close()


@pytest.mark.parametrize(
    "name", ["", "A", "hosp a", "hosp/a", "../x", "-lead", "é", "x" * 65, "hosp.a"]
)
def test_a_partition_name_must_be_safe_in_urls_and_blob_keys(archive: Archive, name: str) -> None:
    with pytest.raises(InvalidArgument):
        create_partition(archive.index, name, [], reserved_ae_title="HILUM")
    assert not partition_exists(archive.index, name)


@pytest.mark.parametrize("title", ["", "   ", "A\\B", "TAB\tX", "X" * 17, "NUL\x00"])
def test_an_ae_title_follows_ps3_5_ae_vr(archive: Archive, title: str) -> None:
    with pytest.raises(InvalidArgument):
        create_partition(archive.index, "hosp-a", [title], reserved_ae_title="HILUM")
    assert not partition_exists(archive.index, "hosp-a")  # nothing half-created


def test_an_ae_title_belongs_to_one_partition(archive: Archive) -> None:
    index = archive.index
    create_partition(index, "hosp-a", ["HOSP_A", " HOSP_A2 "], reserved_ae_title="HILUM")
    with pytest.raises(Conflict):
        create_partition(index, "hosp-b", ["HOSP_A"], reserved_ae_title="HILUM")
    with pytest.raises(Conflict):
        create_partition(index, "hosp-b", ["HILUM"], reserved_ae_title="HILUM")
    with pytest.raises(Conflict):
        create_partition(index, "hosp-a", [], reserved_ae_title="HILUM")
    assert [(p.name, p.ae_titles) for p in list_partitions(index)] == [
        ("default", ()),
        ("hosp-a", ("HOSP_A", "HOSP_A2")),
    ]
    assert partition_exists(index, "hosp-a") and not partition_exists(index, "hosp-b")


def test_the_association_policy_read(archive: Archive) -> None:
    index = archive.index
    create_partition(index, "hosp-a", ["HOSP_A"], reserved_ae_title="HILUM")

    def policy(calling: str, called: str, *, strict: bool = True):
        return association_policy(index, calling, called, default_ae_title="HILUM",
                                  unknown_called_is_default=not strict)  # fmt: skip

    assert policy("CT", "HOSP_A") == AssociationPolicy("hosp-a", None, restricted=False)
    assert policy("CT", "OTHER").partition is None
    assert policy("CT", "OTHER", strict=False).partition == "default"
    set_ae_permission(
        index, AEPermissionEntry("CT", "hosp-a", True, False, False, ("10.1.2.0/24",))
    )
    found = policy("CT", "HOSP_A")
    assert found.restricted and found.permission == list_ae_permissions(index)[0]
    assert policy("CT", "HILUM").permission is None  # none in the default partition
    assert found.permission is not None
    assert found.permission.allows_address("10.1.2.9")
    assert found.permission.allows_address("::ffff:10.1.2.9")  # a dual-stack socket's form
    assert not found.permission.allows_address("10.1.3.9")
    assert not found.permission.allows_address("not-an-address")
