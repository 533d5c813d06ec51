"""The DICOM access page (/admin/dicom-access) in Chromium: partitions, AE permissions and C-MOVE
destinations created and removed through /api/admin, and the DIMSE SCP obeying them at once."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Page, expect

from server.app import HttpServer, create_app
from server.dimse.ae import DimseServer
from storage.archive import open_archive
from tests.conftest import free_port, make_settings
from tests.factories import DCMTK_STORESCU, ct_instance, write_part10
from tests.waiting import wait_until
from tests.web.conftest import screenshot


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[str, DimseServer]]:
    settings = make_settings(tmp_path)
    archive = open_archive(settings, migrate=True)
    dimse = DimseServer(settings, archive)
    dimse.start()
    http = HttpServer(create_app(settings, archive), "127.0.0.1", free_port())
    http.start()
    try:
        yield f"http://127.0.0.1:{http.port}", dimse
    finally:
        http.stop()
        dimse.stop()
        archive.close()


def test_an_administrator_sets_up_a_partition_its_modality_and_a_destination(
    servers: tuple[str, DimseServer], page: Page, tmp_path: Path
) -> None:
    url, dimse = servers
    page.goto(url + "/admin/dicom-access")
    assert page.title() == "DICOM access · Hilum"
    unlabelled = page.eval_on_selector_all(
        "input:not([type=hidden]), select, textarea",
        "es => es.filter(e => !e.labels || e.labels.length === 0).map(e => e.outerHTML)",
    )
    assert unlabelled == []
    expect(page.locator("#partition-rows")).to_contain_text("HILUM")
    expect(page.locator("#permissions-mode")).to_contain_text("None stored")

    page.get_by_label("Name").fill("hosp-a")
    page.get_by_label("Called AE Titles (comma-separated)").fill("HOSP_A, HOSP_A2")
    page.get_by_role("button", name="Create partition").click()
    expect(page.locator("#access-status")).to_have_text("Partition hosp-a created.")
    expect(page.locator("#partition-rows")).to_contain_text("HOSP_A, HOSP_A2")

    # An AE title already used by another partition: the server's reason is shown.
    page.get_by_label("Name").fill("hosp-b")
    page.get_by_label("Called AE Titles (comma-separated)").fill("HOSP_A")
    page.get_by_role("button", name="Create partition").click()
    expect(page.locator("#access-status")).to_contain_text("already used by another partition")

    page.get_by_label("Calling AE Title").fill("CT_A")
    page.get_by_label("Partition", exact=True).select_option("hosp-a")
    page.get_by_label("Store").check()
    page.get_by_label("Networks (CIDR, comma-separated; empty: any)").fill("127.0.0.0/8")
    page.get_by_role("button", name="Save permission").click()
    expect(page.locator("#access-status")).to_have_text("Permission of CT_A in hosp-a saved.")
    expect(page.locator("#permission-rows")).to_contain_text("127.0.0.0/8")
    expect(page.locator("#permissions-mode")).to_contain_text("Only the calling AE titles")

    page.get_by_label("AE Title", exact=True).fill("VIEWER")
    page.get_by_label("Host").fill("127.0.0.1")
    page.get_by_label("Port").fill("11113")
    page.get_by_role("button", name="Save destination").click()
    expect(page.locator("#peer-rows")).to_contain_text("VIEWER")
    screenshot(page, "dicom-access")

    # The DIMSE SCP follows at the next association: CT_A stores into hosp-a, others are out.
    path = write_part10(ct_instance(), tmp_path / "a.dcm")

    def store(calling: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [DCMTK_STORESCU, "-aet", calling, "-aec", "HOSP_A", "127.0.0.1", str(dimse.port),
             str(path)], capture_output=True, text=True, timeout=60, env={"TCP_NODELAY": "1"},
        )  # fmt: skip

    assert store("CT_A").returncode == 0
    assert "Association Rejected" in store("CT_B").stderr

    page.get_by_role("button", name="Remove CT_A in hosp-a").click()
    expect(page.locator("#access-status")).to_have_text("Removed CT_A in hosp-a.")
    expect(page.locator("#permission-rows")).not_to_contain_text("CT_A")
    page.get_by_role("button", name="Remove destination VIEWER").click()
    expect(page.locator("#peer-rows")).not_to_contain_text("VIEWER")

    # A browser origin listed at run time: its preflight for DELETE is allowed once the CORS
    # list is read again (within ORIGINS_TTL_S); then it is removed from the list.
    viewer = "https://viewer.example.org"
    page.get_by_label("Origin", exact=True).fill(viewer)
    page.get_by_role("button", name="Add origin").click()
    expect(page.locator("#access-status")).to_have_text(f"Origin {viewer} listed.")
    expect(page.locator("#origin-rows")).to_contain_text(viewer)
    screenshot(page, "dicom-access-cors")

    def preflight() -> str | None:
        answer = requests.options(
            url + "/dicomweb/studies/1.2.3",
            headers={"Origin": viewer, "Access-Control-Request-Method": "DELETE"},
            timeout=30,
        )
        return answer.headers.get("Access-Control-Allow-Origin")

    wait_until(lambda: preflight() == viewer, "the listed origin's preflight", timeout_s=30)
    page.get_by_role("button", name=f"Remove origin {viewer}").click()
    expect(page.locator("#origin-rows")).not_to_contain_text(viewer)
