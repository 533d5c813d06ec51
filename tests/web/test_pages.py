"""The UI in Chromium against a real Hilum: the worklist with each study's AI state, its filters
and paging; the study page's findings, Accept and Reject stored as verified SRs that QIDO-RS
returns; the upload page; the jobs page and its re-run; titles, labels and the keyboard.

One server for the module: studies are sent once with DCMTK storescu, and the reference CT model
runs on the synthetic phantom in the worker thread."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Page, expect
from pydicom.uid import generate_uid

from inference.phantoms import synthetic_ct_series
from storage.jobs import JobState
from storage.worklist import AIState, WorklistRequest, search_worklist
from tests.factories import ct_instance, ensure_partition, write_part10
from tests.waiting import wait_until
from tests.web.conftest import Hilum, screenshot

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
DCIODVFY = Path("/usr/bin/dciodvfy")


@dataclass(frozen=True)
class Studies:
    phantom: str  # CT ABDOMEN, STAT: the reference model finds its lesion
    chest: str  # CT CHEST: no model applies
    mr: str  # MR: no model applies
    bulk: list[str]  # more studies, for paging

    @property
    def all(self) -> set[str]:
        return {self.phantom, self.chest, self.mr, *self.bulk}


def _study(folder: Path, count: int, **values: object) -> tuple[str, list[Path]]:
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(count):
        ds = ct_instance(study, series, seed=i, modality=str(values.pop("Modality", "CT")))
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        files.append(write_part10(ds, folder / f"{ds.SOPInstanceUID}.dcm"))
    return study, files


@pytest.fixture(scope="module")
def studies(hilum: Hilum, tmp_path_factory: pytest.TempPathFactory) -> Studies:
    folder = tmp_path_factory.mktemp("studies")
    ct, _ = synthetic_ct_series(301, slices=8)
    for ds in ct:
        ds.RequestedProcedurePriority = "STAT"  # [inference.priority]: STAT jobs, on top
    phantom_files = [write_part10(ds, folder / f"ct{i}.dcm") for i, ds in enumerate(ct)]
    chest, chest_files = _study(
        folder, 2, PatientName="ROE^RICHARD", PatientID="P-ROE", AccessionNumber="ACC-ROE",
        StudyDate="20260301", BodyPartExamined="CHEST",
    )  # fmt: skip
    mr, mr_files = _study(
        folder, 1, Modality="MR", PatientName="MOE^MARY", PatientID="P-MOE",
        AccessionNumber="ACC-MOE", StudyDate="20250101",
    )  # fmt: skip
    bulk = []
    for i in range(4):
        uid, files = _study(
            folder, 1, PatientName=f"BULK^{i}", PatientID=f"P-BULK-{i}", StudyDate="20240601"
        )
        bulk.append(uid)
        hilum.store(files)
    hilum.store([*phantom_files, *chest_files, *mr_files])
    phantom = str(ct[0].StudyInstanceUID)

    def settled() -> bool:
        page = search_worklist(hilum.archive, WorklistRequest(matching={}, limit=100))
        state = {s.study_instance_uid: s.ai_state for s in page.studies}
        return state.get(phantom) == AIState.FINDINGS and all(
            state.get(uid) == AIState.NO_MODEL for uid in [chest, mr, *bulk]
        )

    wait_until(settled, "the phantom's AI findings and every other study settled")
    return Studies(phantom, chest, mr, bulk)


def rows(page: Page) -> dict[str, str]:
    """The worklist's rows: StudyInstanceUID -> AI state, in order."""
    found = page.eval_on_selector_all(
        "#worklist-rows tr[data-study]", "rs => rs.map(r => [r.dataset.study, r.dataset.aiState])"
    )
    return dict(found)


def test_the_worklist_shows_each_study_with_its_ai_state_stat_on_top(
    hilum: Hilum, studies: Studies, page: Page
) -> None:
    page.goto(hilum.url + "/")
    expect(page).to_have_title(re.compile("Worklist"))
    listed = rows(page)
    assert set(listed) == studies.all
    assert next(iter(listed)) == studies.phantom  # STAT first
    assert listed[studies.phantom] == AIState.FINDINGS
    assert listed[studies.chest] == listed[studies.mr] == AIState.NO_MODEL
    first = page.locator(f'tr[data-study="{studies.phantom}"]')
    expect(first).to_contain_text("STAT")
    expect(first).to_contain_text("Findings (1)")
    chest = page.locator(f'tr[data-study="{studies.chest}"]')
    expect(chest).to_contain_text("No model applies")
    screenshot(page, "worklist")

    # Why no model applies: on the study page, from the stability scan's rules.
    chest.get_by_role("link").click()
    expect(page.locator(".ai-note")).to_have_text(
        "Why: CT series, body part CHEST: ct_lesion_synthetic needs body part ABDOMEN "
        "(not CHEST); wsi_tissue_synthetic needs modality SM (not CT), SOP class "
        "1.2.840.10008.5.1.4.1.1.77.1.6 (not 1.2.840.10008.5.1.4.1.1.2), body part BREAST "
        "(not CHEST)."
    )
    screenshot(page, "study-no-model")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("#f-name", "roe", "chest"),
        ("#f-pid", "P-MOE", "mr"),
        ("#f-acc", "ACC-ROE", "chest"),
        ("#f-from", "2025-06-01", "chest+phantom"),
        ("#f-mod", "MR", "mr"),
        ("#f-ai", "findings", "phantom"),
        ("#f-finding", "lesion", "phantom"),
    ],
)
def test_each_filter_narrows_the_list(
    hilum: Hilum, studies: Studies, page: Page, field: str, value: str, expected: str
) -> None:
    page.goto(hilum.url + "/")
    control = page.locator(field)
    if control.evaluate("e => e.tagName") == "SELECT":
        control.select_option(value)
    else:
        control.fill(value)
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(re.compile(r"\?"))
    wanted = {getattr(studies, name) for name in expected.split("+")}
    assert set(rows(page)) == wanted
    if field == "#f-from":
        page.locator("#f-to").fill("2026-02-01")  # the range's other end narrows further
        page.get_by_role("button", name="Search").click()
        page.wait_for_url(re.compile("date_to=2026-02-01"))
        assert set(rows(page)) == {studies.phantom}  # study date 2026-01-15
        screenshot(page, "worklist-filtered")


def test_paging_walks_every_study_once(hilum: Hilum, studies: Studies, page: Page) -> None:
    page.goto(hilum.url + "/?limit=3&sort=patient_name&order=asc")
    seen: list[str] = []
    for _ in range(10):
        current = list(rows(page))
        assert 1 <= len(current) <= 3
        seen += current
        following = page.get_by_role("link", name="Next page »")
        if following.count() == 0:
            break
        following.click()
        page.wait_for_load_state()
    assert sorted(seen) == sorted(studies.all)  # each once
    assert seen[0] == studies.phantom  # STAT first, then by name
    names = seen[1:]
    assert names.index(studies.bulk[0]) < names.index(studies.mr) < names.index(studies.chest)


def test_a_new_study_appears_without_a_reload(
    hilum: Hilum, studies: Studies, page: Page, tmp_path: Path
) -> None:
    page.goto(hilum.url + "/?name=NEWCOMER")
    assert rows(page) == {}
    uid, files = _study(tmp_path, 1, PatientName="NEWCOMER^NED", BodyPartExamined="HEAD")
    hilum.store(files)
    page.evaluate("hilumRefreshWorklist()")  # what the page's 10 s timer calls
    expect(page.locator(f'tr[data-study="{uid}"]')).to_have_count(1)
    assert rows(page)[uid] in (AIState.WAITING, AIState.NO_MODEL)


def review(page: Page, decision: str, reviewer: str, comment: str = "") -> None:
    form = page.locator("form.review").first
    form.get_by_label("Reviewer").fill(reviewer)
    form.get_by_label("Comment (optional)").fill(comment)
    form.get_by_role("button", name=decision).click()
    page.wait_for_url(re.compile(r"saved="))


def stored_reviews(hilum: Hilum, study: str) -> list[dict]:
    response = requests.get(f"{hilum.url}/api/studies/{study}/reviews", timeout=30)
    assert response.status_code == 200
    return response.json()


def qido_sr_instances(hilum: Hilum, study: str) -> set[str]:
    response = requests.get(
        f"{hilum.url}/dicomweb/studies/{study}/instances",
        params={"SOPClassUID": COMPREHENSIVE_3D_SR},
        timeout=30,
    )
    assert response.status_code == 200
    return {item["00080018"]["Value"][0] for item in response.json()}


def test_the_study_page_lists_the_findings_and_accept_stores_a_verified_sr(
    hilum: Hilum, studies: Studies, page: Page
) -> None:
    page.goto(f"{hilum.url}/studies/{studies.phantom}")
    expect(page.locator("h4").first).to_have_text("Lesion in Abdomen")
    job = page.locator("article.job").first
    expect(job).to_contain_text("ct_lesion_synthetic")
    expect(job).to_contain_text("version 1.0.0")
    expect(job).to_contain_text("Trained on synthetic data, not for clinical use.")
    expect(job).to_contain_text(re.compile(r"Volume: [\d.]+ mm³"))
    # Each lesion outlined on its largest slice, with its long axis and area (TID 1410).
    expect(job.locator("ul.outlines li").first).to_contain_text(
        re.compile(r"Lesion 1 \(ct_lesion_synthetic\): long axis [\d.]+ mm, area [\d.]+ mm²")
    )
    thumbnail = page.locator("ul.series img").first
    expect(thumbnail).to_be_visible()
    wait_until(lambda: thumbnail.evaluate("i => i.complete && i.naturalWidth > 0"), "thumbnail")
    expect(page.get_by_role("link", name="Open in viewer")).to_have_attribute(
        "href", f"/viewer?StudyInstanceUIDs={studies.phantom}"
    )
    before = qido_sr_instances(hilum, studies.phantom)

    review(page, "Accept", "Dr Jane Doe")
    expect(page.locator(".decision")).to_contain_text("Accepted by Dr Jane Doe")
    page.reload()
    expect(page.locator(".decision")).to_contain_text("Accepted by Dr Jane Doe")
    screenshot(page, "study-accepted")

    # The findings are index rows too, with their job's model.
    findings = requests.get(f"{hilum.url}/api/studies/{studies.phantom}/findings", timeout=30)
    (lesion,) = findings.json()
    assert lesion["finding"] == "Lesion" and lesion["site"] == "Abdomen" and lesion["present"]
    assert lesion["finding_code"] == "SCT:52988006" and lesion["size_unit"] == "mm3"
    assert lesion["model"] == {"name": "ct_lesion_synthetic", "version": "1.0.0"}
    assert lesion["segment_number"] == 1 and lesion["segmentation_sop_instance_uid"]

    (accepted,) = stored_reviews(hilum, studies.phantom)
    assert accepted["decision"] == "accepted" and accepted["reviewer"] == "Dr Jane Doe"
    assert accepted["finding"] == "Lesion in Abdomen"
    assert accepted["model"] == {"name": "ct_lesion_synthetic", "version": "1.0.0"}
    assert qido_sr_instances(hilum, studies.phantom) == before | {accepted["review"]}
    metadata = requests.get(
        _instance_url(hilum, studies.phantom, accepted["review"]) + "/metadata", timeout=30
    ).json()[0]
    assert metadata["0040A493"]["Value"] == ["VERIFIED"]  # VerificationFlag, PS3.3 C.17.2
    observer = metadata["0040A073"]["Value"][0]  # VerifyingObserverSequence
    assert observer["0040A075"]["Value"][0]["Alphabetic"] == "Dr Jane Doe^"  # one component
    predecessor = metadata["0040A360"]["Value"][0]  # PredecessorDocumentsSequence
    referenced = predecessor["00081115"]["Value"][0]["00081199"]["Value"][0]
    assert referenced["00081155"]["Value"] == [accepted["report"]]


def _instance_url(hilum: Hilum, study: str, sop_instance_uid: str) -> str:
    response = requests.get(
        f"{hilum.url}/dicomweb/studies/{study}/instances",
        params={"SOPInstanceUID": sop_instance_uid},
        timeout=30,
    )
    (item,) = response.json()
    return item["00081190"]["Value"][0]  # RetrieveURL


def test_reject_with_a_comment_is_stored_and_shown_after_reload(
    hilum: Hilum, studies: Studies, page: Page, tmp_path: Path
) -> None:
    page.goto(f"{hilum.url}/studies/{studies.phantom}")
    review(page, "Reject", "Dr Max Roe", "motion artefact, not a lesion")
    page.reload()
    decision = page.locator(".decision")
    expect(decision).to_contain_text("Rejected by Dr Max Roe")
    expect(decision).to_contain_text("motion artefact, not a lesion")
    screenshot(page, "study-rejected")

    latest = stored_reviews(hilum, studies.phantom)[-1]
    assert latest["decision"] == "rejected" and latest["comment"] == "motion artefact, not a lesion"
    # Every decision, across studies, for an export of labels.
    labels = requests.get(f"{hilum.url}/api/reviews", timeout=30).json()
    assert [(r["decision"], r["reviewer"]) for r in labels] == [
        ("accepted", "Dr Jane Doe"),
        ("rejected", "Dr Max Roe"),
    ]
    rejected = requests.get(f"{hilum.url}/api/reviews?decision=rejected", timeout=30).json()
    assert [r["review"] for r in rejected] == [latest["review"]]
    after = requests.get(f"{hilum.url}/api/reviews?after={labels[0]['id']}", timeout=30).json()
    assert [r["id"] for r in after] == [labels[1]["id"]]
    assert requests.get(f"{hilum.url}/api/reviews?decision=maybe", timeout=30).status_code == 400
    assert latest["review"] in qido_sr_instances(hilum, studies.phantom)
    # The review SR is a valid Comprehensive 3D SR (dicom3tools' dciodvfy finds no error).
    response = requests.get(
        _instance_url(hilum, studies.phantom, latest["review"]),
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=30,
    )
    assert response.status_code == 200
    body = response.content
    start = body.index(b"DICM") - 128
    end = body.rindex(b"\r\n--")
    path = tmp_path / "review.dcm"
    path.write_bytes(body[start:end])
    report = subprocess.run(
        [str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    errors = [line for line in (report.stdout + report.stderr).splitlines() if "Error" in line]
    assert errors == []


def test_the_worklist_marks_a_reviewed_study(hilum: Hilum, studies: Studies, page: Page) -> None:
    page.goto(hilum.url + "/")
    # Accepted, then rejected: the finding's current decision is the rejection.
    reviewed = page.locator(f'tr[data-study="{studies.phantom}"] .badge.reviewed')
    expect(reviewed).to_have_text(["1 rejected"])
    expect(page.locator(f'tr[data-study="{studies.chest}"] .badge.reviewed')).to_have_count(0)


def test_upload_stores_files_and_shows_a_refused_files_reason(
    hilum: Hilum, studies: Studies, page: Page, tmp_path: Path
) -> None:
    study, files = _study(tmp_path, 2, PatientName="UPLOAD^URSULA", BodyPartExamined="KNEE")
    junk = tmp_path / "not-dicom.dcm"
    junk.write_bytes(b"\x00" * 128 + b"DICM" + b"this is no data set")
    page.goto(hilum.url + "/upload")
    expect(page).to_have_title(re.compile("Upload"))
    page.locator("#pick-files").set_input_files([*map(str, files), str(junk)])
    expect(page.locator("#upload-rows tr[data-outcome]")).to_have_count(3)
    outcomes = dict(
        page.eval_on_selector_all(
            "#upload-rows tr",
            "rs => rs.map(r => [r.cells[0].textContent, r.cells[2].textContent])",
        )
    )
    assert outcomes[files[0].name] == outcomes[files[1].name] == "stored"
    assert outcomes["not-dicom.dcm"].startswith("refused: cannot understand")
    expect(page.locator("#upload-summary")).to_have_text("2 stored, 0 duplicate, 1 refused.")
    screenshot(page, "upload")
    response = requests.get(
        f"{hilum.url}/dicomweb/studies",
        params={"StudyInstanceUID": study, "includefield": "NumberOfStudyRelatedInstances"},
        timeout=30,
    )
    (found,) = response.json()
    assert found["00201208"]["Value"] == [2]


def test_the_jobs_page_lists_jobs_and_re_runs_one(
    hilum: Hilum, studies: Studies, page: Page
) -> None:
    page.goto(f"{hilum.url}/jobs?study={studies.phantom}")
    expect(page).to_have_title(re.compile("AI jobs"))
    page.get_by_role("button", name="Show").click()
    (job,) = hilum.worker.queue.for_study(studies.phantom)
    row = page.locator(f'#job-rows tr[data-job="{job.id}"]')
    expect(row).to_have_attribute("data-state", "done")
    expect(row).to_contain_text("ct_lesion_synthetic 1.0.0")
    expect(row).to_contain_text("STAT (100)")
    screenshot(page, "jobs")
    row.get_by_role("button", name=f"Re-run job {job.id}").click()
    expect(page.locator("#jobs-status")).to_have_text(f"Job {job.id} queued again.")
    assert hilum.worker.queue.get(job.id).generation == job.generation + 1
    # The worker runs it again; the page then lists it done once more.
    wait_until(
        lambda: hilum.worker.queue.get(job.id).state == JobState.DONE, "the re-run job to end"
    )
    page.locator("#j-state").select_option("done")
    page.get_by_role("button", name="Show").click()
    expect(page.locator(f'#job-rows tr[data-job="{job.id}"]')).to_have_attribute(
        "data-state", "done"
    )


@pytest.mark.parametrize("path", ["/", "/jobs", "/upload", "/viewer", "/studies/{phantom}"])
def test_every_page_has_a_title_and_labelled_inputs(
    hilum: Hilum, studies: Studies, page: Page, path: str
) -> None:
    page.goto(hilum.url + path.format(phantom=studies.phantom))
    assert page.title().endswith("· Hilum") and len(page.title()) > len("· Hilum")
    unlabelled = page.eval_on_selector_all(
        "input:not([type=hidden]), select, textarea",
        "es => es.filter(e => !e.labels || e.labels.length === 0).map(e => e.outerHTML)",
    )
    assert unlabelled == []
    if path == "/viewer":
        expect(page.locator("main")).to_contain_text("hilum viewer install")
        screenshot(page, "viewer-not-installed")


def test_the_worklist_works_with_the_keyboard(hilum: Hilum, studies: Studies, page: Page) -> None:
    page.goto(hilum.url + "/")
    page.locator("#f-name").focus()
    page.keyboard.type("moe")
    page.keyboard.press("Enter")  # submits the filter form
    page.wait_for_url(re.compile("name=moe"))
    for _ in range(40):  # Tab to the study's link, then open it with Enter
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.closest('#worklist-rows') !== null"):
            break
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(f"/studies/{re.escape(studies.mr)}$"))
    expect(page.locator("h1")).to_contain_text("MOE, MARY")


def test_an_administrator_runs_a_model_on_a_study_by_hand(
    hilum: Hilum, studies: Studies, page: Page
) -> None:
    # The chest CT: no rule matched (body part), but the CT model can read its series.
    page.goto(f"{hilum.url}/studies/{studies.chest}")
    page.get_by_label("Run a model on this study by hand").select_option("ct_lesion_synthetic")
    page.get_by_role("button", name="Run").click()
    expect(page.locator(".message.ok")).to_have_text("Queued ct_lesion_synthetic on 1 series.")
    (job,) = hilum.worker.queue.for_study(studies.chest)
    assert job.model_name == "ct_lesion_synthetic"
    ended = wait_until(
        lambda: hilum.worker.queue.get(job.id).state in (JobState.DONE, JobState.FAILED),
        "the job run by hand to end",
    )
    assert ended
    page.reload()
    assert page.locator("h2 .ai").inner_text() != "No model applies"

    # The MR: the CT model cannot read it; the page says why, and nothing is queued.
    page.goto(f"{hilum.url}/studies/{studies.mr}")
    page.get_by_role("button", name="Run").click()
    expect(page.locator("h1")).to_have_text("Not possible now")
    expect(page.locator("main")).to_contain_text("ct_lesion_synthetic reads CT series")
    assert hilum.worker.queue.for_study(studies.mr) == []
    response = requests.post(
        f"{hilum.url}/api/studies/{studies.mr}/jobs", json={"model": "nonexistent"}, timeout=30
    )
    assert response.status_code == 400 and "no installed model" in response.json()["error"]


def test_a_partitions_pages_show_and_store_into_that_partition_only(
    hilum: Hilum, studies: Studies, page: Page, tmp_path: Path
) -> None:
    """``/partitions/{name}/``: its worklist, its upload (STOW-RS to its DICOMweb root), its
    study page and its jobs; the default partition's worklist never shows its studies."""
    ensure_partition(hilum.archive.index, "hospital_a")
    root = f"{hilum.url}/partitions/hospital_a"
    study, files = _study(tmp_path, 1, PatientName="PARTITION^PAULA", BodyPartExamined="KNEE")
    page.goto(root + "/upload")
    expect(page.locator("header.top .partition")).to_have_text("hospital_a")
    page.locator("#pick-files").set_input_files([str(files[0])])
    expect(page.locator("#upload-summary")).to_have_text("1 stored, 0 duplicate, 0 refused.")

    page.goto(root + "/")
    expect(page.locator(f"#worklist-rows tr[data-study='{study}']")).to_have_count(1)
    assert set(rows(page)) == {study}  # none of the default partition's studies
    screenshot(page, "partition-worklist")
    page.locator(f"#worklist-rows tr[data-study='{study}'] a").first.click()
    expect(page).to_have_url(f"{root}/studies/{study}")
    expect(page.locator("h1")).to_contain_text("PARTITION, PAULA")
    screenshot(page, "partition-study")
    page.locator("nav a", has_text="AI jobs").click()
    expect(page).to_have_url(f"{root}/jobs")

    page.goto(hilum.url + "/")
    assert study not in rows(page) and studies.phantom in rows(page)
    assert requests.get(f"{hilum.url}/studies/{study}", timeout=30).status_code == 404
    assert requests.get(f"{hilum.url}/partitions/nowhere/", timeout=30).status_code == 404
