"""The administration API (/api/admin): partitions, AE permissions and C-MOVE destinations over
real HTTP, and a change seen by the next DIMSE association without a restart."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from config import Settings
from server.app import HttpServer, create_app
from server.dimse.ae import DimseServer
from storage.archive import Archive, open_archive
from tests.conftest import free_port, make_settings
from tests.factories import DCMTK_STORESCU, ct_instance, write_part10

SEED = {
    "ae_permissions": [{"ae_title": "CT_SEEDED", "store": True, "query": False,
                        "retrieve": False, "networks": ["10.0.0.0/8"]}],
    "peers": [{"ae_title": "VIEWER", "host": "127.0.0.1", "port": 11113}],
}  # fmt: skip


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[tuple[str, Settings, Archive]]:
    settings = make_settings(tmp_path, dimse=SEED)
    archive = open_archive(settings, migrate=True)
    server = HttpServer(create_app(settings, archive), "127.0.0.1", free_port())
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}/api/admin", settings, archive
    finally:
        server.stop()
        archive.close()


def test_the_settings_file_seeds_permissions_and_peers_once(
    admin: tuple[str, Settings, Archive],
) -> None:
    url, _settings, _archive = admin
    assert requests.get(f"{url}/ae-permissions", timeout=10).json() == [
        {"calling_ae_title": "CT_SEEDED", "partition": "default", "store": True, "query": False,
         "retrieve": False, "networks": ["10.0.0.0/8"]},
    ]  # fmt: skip
    assert requests.get(f"{url}/peers", timeout=10).json() == [
        {"ae_title": "VIEWER", "host": "127.0.0.1", "port": 11113, "tls": False}
    ]
    # Removed at run time: stays removed (the seed is not copied again).
    assert requests.delete(f"{url}/peers/VIEWER", timeout=10).status_code == 204
    assert requests.get(f"{url}/peers", timeout=10).json() == []


def test_partitions_permissions_and_peers_are_managed_over_http(
    admin: tuple[str, Settings, Archive], tmp_path: Path
) -> None:
    url, settings, archive = admin
    created = requests.post(
        f"{url}/partitions", json={"name": "lab-1", "ae_titles": ["LAB1"]}, timeout=10
    )
    assert created.status_code == 201, created.text
    assert requests.get(f"{url}/partitions", timeout=10).json() == [
        {"name": "default", "ae_titles": ["HILUM"]},
        {"name": "lab-1", "ae_titles": ["LAB1"]},
    ]
    for body, reason in (
        ({"name": "Lab 2"}, "not a valid partition name"),
        ({"name": "lab-2", "ae_titles": ["LAB1"]}, "already used"),
        ({"name": "lab-2", "ae_titles": ["HILUM"]}, "default partition"),
        ({"name": "lab-2", "ae_titles": "LAB2"}, "list of strings"),
    ):
        refused = requests.post(f"{url}/partitions", json=body, timeout=10)
        assert refused.status_code in (400, 409) and reason in refused.json()["error"], body

    titles = f"{url}/partitions/lab-1/ae-titles"
    assert requests.put(f"{titles}/LAB1B", timeout=10).status_code == 204
    assert requests.put(f"{titles}/LAB1B", timeout=10).status_code == 409
    assert requests.put(f"{url}/partitions/nowhere/ae-titles/X", timeout=10).status_code == 404
    assert requests.delete(f"{titles}/LAB1B", timeout=10).status_code == 204
    assert requests.delete(f"{titles}/LAB1B", timeout=10).status_code == 404
    assert requests.get(f"{url}/partitions", timeout=10).json()[1]["ae_titles"] == ["LAB1"]

    put = requests.put(
        f"{url}/ae-permissions/LAB_CT/lab-1",
        json={"store": True, "networks": ["127.0.0.1"]},
        timeout=10,
    )
    assert put.status_code == 201, put.text
    assert put.json()["networks"] == ["127.0.0.1/32"]
    bad = requests.put(f"{url}/ae-permissions/LAB_CT/lab-1", json={"networks": ["x"]}, timeout=10)
    assert bad.status_code == 400 and "not a network" in bad.json()["error"]
    missing = requests.put(f"{url}/ae-permissions/LAB_CT/nowhere", json={}, timeout=10)
    assert missing.status_code == 404

    # The DIMSE SCP started now: LAB_CT stores into lab-1 through LAB1; nobody else may.
    server = DimseServer(settings, archive)
    server.start()
    try:
        path = write_part10(ct_instance(), tmp_path / "a.dcm")

        def store(calling: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [DCMTK_STORESCU, "-aet", calling, "-aec", "LAB1", "127.0.0.1", str(server.port),
                 str(path)], capture_output=True, text=True, timeout=60,
                env={"TCP_NODELAY": "1"},
            )  # fmt: skip

        assert store("LAB_CT").returncode == 0
        assert "Association Rejected" in store("OTHER").stderr
        # Removed over HTTP: the next association is rejected, no restart.
        assert requests.delete(f"{url}/ae-permissions/LAB_CT", timeout=10).status_code == 204
        assert "Association Rejected" in store("LAB_CT").stderr
        assert requests.delete(f"{url}/ae-permissions/LAB_CT", timeout=10).status_code == 404
    finally:
        server.stop()

    peer = requests.put(f"{url}/peers/PACS2", json={"host": "10.1.2.3", "port": 104}, timeout=10)
    assert peer.status_code == 201
    replaced = requests.put(
        f"{url}/peers/PACS2", json={"host": "10.1.2.4", "port": 104, "tls": False}, timeout=10
    )
    assert replaced.status_code == 200
    assert {"ae_title": "PACS2", "host": "10.1.2.4", "port": 104, "tls": False} in requests.get(
        f"{url}/peers", timeout=10
    ).json()
    assert requests.put(f"{url}/peers/PACS2", json={"host": "h"}, timeout=10).status_code == 400
