"""The audit page in Chromium: a privacy officer finds who sent, opened and retrieved a
patient's images, searching by patient ID; the search itself is recorded."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect
from pydicom.uid import generate_uid

from tests.factories import ct_instance, write_part10
from tests.web.conftest import Hilum, screenshot


@pytest.fixture(scope="module")
def study(hilum: Hilum, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("audit-study")
    study, series = generate_uid(), generate_uid()
    files = [
        write_part10(ct_instance(study, series, seed=i, patient_id="MRN-4711"), folder / f"{i}.dcm")
        for i in range(2)
    ]
    hilum.store(files)
    return study


def test_a_privacy_officer_finds_every_access_to_a_patient(
    hilum: Hilum, study: str, page: Page
) -> None:
    page.goto(f"{hilum.url}/studies/{study}")
    expect(page.get_by_role("heading", level=1)).to_be_visible()

    page.goto(f"{hilum.url}/audit")
    expect(page).to_have_title("Audit trail · Hilum")
    page.get_by_label("Patient ID").fill("MRN-4711")
    page.get_by_role("button", name="Search").click()
    rows = page.locator("table.audit tbody tr")
    expect(rows.filter(has_text="Opened the study page")).to_have_count(1)
    sent = rows.filter(has_text="Sent 2 images over DICOM: 2 new")
    expect(sent).to_have_count(1)
    expect(sent).to_contain_text("STORESCU")
    expect(sent).to_contain_text("DICOM device (AE title)")
    expect(sent).to_contain_text("Allowed, done")
    expect(rows.filter(has_text="Searched the audit trail")).to_have_count(1)
    expect(rows.filter(has_text="MRN-4711").first).to_be_visible()
    # Every row shown is this patient's.
    for text in rows.locator("td:nth-child(5)").all_inner_texts():
        assert text == "MRN-4711"
    screenshot(page, "audit-patient")

    page.goto(f"{hilum.url}/audit?since=yesterday")
    expect(page.get_by_role("alert")).to_contain_text("since must be an ISO 8601 date")
