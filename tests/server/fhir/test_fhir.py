"""FHIR R4 from a real AI result: the CT reference model runs on its phantom; the ImagingStudy,
DiagnosticReport, Observations and Patient served at /fhir validate with fhir.resources, the
search parameters work, the report's status follows the reviews, and the FHIR push PUTs them to
a FHIR-ish server through the change feed."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

from config import Settings
from inference.phantoms import synthetic_ct_series
from server.app import create_app
from server.events.delivery import DeliveryLoop, subscribers_from_settings
from storage.archive import Archive
from storage.events import changes
from storage.ingest import ingest_file
from storage.reviews import Decision, ReviewDecision, record_review
from tests.conftest import free_port, make_settings
from tests.factories import write_part10
from tests.inference.test_end_to_end import INFERENCE, wait_for_jobs
from tests.inference.test_end_to_end import worker as worker  # the fixture

FHIR = "application/fhir+json"


class FhirServer:
    """A FHIR-ish server: keeps the last body PUT at each path."""

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Any]] = {}
        store = self.resources

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.headers["Content-Type"] == FHIR
                store[self.path] = json.loads(body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/fhir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def fhir_server() -> Iterator[FhirServer]:
    server = FhirServer()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def settings(tmp_path: Path, fhir_server: FhirServer) -> Settings:
    return make_settings(
        tmp_path,
        inference=INFERENCE,
        fhir={"push_url": fhir_server.url, "public_url": "https://pacs.example.org"},
    )


def get(client: Any, url: str, status: int = 200) -> dict[str, Any]:
    response = client.get(url)
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == FHIR
    return response.get_json()


def test_ai_results_as_fhir_resources(
    settings: Settings, archive: Archive, worker: Any, fhir_server: FhirServer, tmp_path: Path
) -> None:
    ct, _truth = synthetic_ct_series(101)
    for n, ds in enumerate(ct):
        ingest_file(archive, write_part10(ds, tmp_path / f"{n}.dcm"))
    study = ct[0].StudyInstanceUID
    (job,) = wait_for_jobs(worker.queue, study, 1)
    assert job.findings, job.reason
    client = create_app(settings, archive).test_client()

    imaging = ImagingStudy.model_validate(get(client, f"/fhir/ImagingStudy/{study}"))
    # The CT, the SEG, the SR and the lesions' outlines (a second SR)
    assert imaging.numberOfInstances == len(ct) + 3
    assert {m.code for m in imaging.modality} == {"CT", "SEG", "SR"}
    assert imaging.contained[0].address == "https://pacs.example.org/dicomweb"
    assert imaging.identifier[0].value == f"urn:oid:{study}"
    patient_ref = imaging.subject.reference
    patient = Patient.model_validate(get(client, f"/fhir/{patient_ref}"))
    assert patient.identifier[0].value == ct[0].PatientID

    reports = Bundle.model_validate(get(client, f"/fhir/DiagnosticReport?study={study}"))
    (entry,) = reports.entry
    report = DiagnosticReport.model_validate(entry.resource.model_dump())
    assert report.status == "preliminary"
    assert report.imagingStudy[0].reference == f"ImagingStudy/{study}"
    observations = [
        Observation.model_validate(get(client, f"/fhir/{result.reference}"))
        for result in report.result
    ]
    present = [o for o in observations if o.valueQuantity is not None]
    assert present and all(o.valueQuantity.system == "http://unitsofmeasure.org" for o in present)
    assert all(o.derivedFrom[0].reference == f"ImagingStudy/{study}" for o in observations)
    assert all(job.model_name in o.method.text for o in observations)

    # Searches: by patient and subject, identifier, _lastUpdated; unknown parameters refused.
    an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    for query in (
        f"patient={patient.id}",
        f"subject={patient_ref}",
        f"identifier=urn:dicom:uid|urn:oid:{study}",
        f"_lastUpdated=ge{an_hour_ago}",
    ):
        bundle = Bundle.model_validate(
            get(client, f"/fhir/ImagingStudy?{query.replace('+', '%2B')}")
        )
        assert [e.resource.id for e in bundle.entry] == [study], query
    assert get(client, "/fhir/ImagingStudy?_lastUpdated=lt2020-01-01")["total"] == 0
    # _count: the first N; past it the total is not known, so not given.
    page = get(client, f"/fhir/Observation?study={study}&_count={len(report.result)}")
    assert len(page["entry"]) == page["total"] == len(report.result)
    page = get(client, f"/fhir/Observation?study={study}&_count={len(report.result) - 1}")
    assert len(page.get("entry", [])) == len(report.result) - 1 and "total" not in page
    by_identifier = get(client, f"/fhir/DiagnosticReport?identifier={report.identifier[0].value}")
    assert [e["resource"]["id"] for e in by_identifier["entry"]] == [report.id]
    assert get(client, "/fhir/ImagingStudy?patient=patient-999999")["total"] == 0
    assert (
        get(client, "/fhir/ImagingStudy?patient=someone", 400)["resourceType"] == "OperationOutcome"
    )
    assert get(client, "/fhir/Patient/someone", 404)["resourceType"] == "OperationOutcome"
    assert get(client, "/fhir/ImagingStudy?_lastUpdated=soon", 400)["issue"][0]["code"] == "invalid"
    assert get(client, f"/fhir/Observation?patient={patient.id}")["total"] == len(observations)
    assert get(client, "/fhir/ImagingStudy?modality=CT", 400)["resourceType"] == "OperationOutcome"
    assert get(client, "/fhir/ImagingStudy/1.2.3", 404)["resourceType"] == "OperationOutcome"
    assert get(client, "/fhir/Encounter", 404)["resourceType"] == "OperationOutcome"
    CapabilityStatement.model_validate(get(client, "/fhir/metadata"))

    # The reviewers' decisions change the report's status: final, then amended.
    finding = next(o for o in observations if o.valueQuantity is not None)
    for decision, status in [(Decision.ACCEPTED, "final"), (Decision.REJECTED, "amended")]:
        record_review(
            archive,
            ReviewDecision(
                study_instance_uid=study, job_id=job.id, model_name=job.model_name,
                model_version=job.model_version,
                report_sop_instance_uid=report.identifier[0].value.removeprefix("urn:oid:"),
                tracking_uid=finding.id, finding="Lesion", decision=decision,
                reviewer="Dr Test", comment="", decided_at=datetime.now(UTC),
                review_sop_instance_uid="1.2.3.4",
            ),
        )  # fmt: skip
        assert get(client, f"/fhir/DiagnosticReport/{report.id}")["status"] == status
        assert get(client, f"/fhir/Observation/{finding.id}")["status"] == status
        assert get(client, f"/fhir/DiagnosticReport?status={status}")["total"] == 1

    # The change feed told the story in commit order, each event with its state change.
    feed = [e for e in changes(archive, 0, 1000) if e.type != "instance.stored"]
    # Storing the SEG and SR made the study unstable; once quiet again it is stable again
    # (a study.stable with no job: nothing new to analyse), possibly more than once here.
    again = [e for e in feed[1:] if e.type == "study.stable"]
    assert all(e.payload["jobs"] == [] for e in again)
    feed = [e for e in feed if e not in again]
    assert [e.type for e in feed] == [
        "study.stable", "ai.queued", "ai.started", "ai.completed", "ai.reviewed", "ai.reviewed",
    ]  # fmt: skip
    assert feed[0].payload["jobs"] == [job.id] and feed[3].payload["findings"] == job.findings
    assert [e.payload["decision"] for e in feed[4:]] == ["accepted", "rejected"]
    stored = [e for e in changes(archive, 0, 1000) if e.type == "instance.stored"]
    # The CT, then the SEG, the SR and the outlines SR (outcome "stored")
    assert len(stored) == len(ct) + 3

    # The push: every resource PUT to the FHIR server, the report with its latest status.
    loop = DeliveryLoop(settings, archive, subscribers_from_settings(settings, archive))
    while loop.step():
        pass
    pushed = fhir_server.resources
    assert pushed[f"/fhir/DiagnosticReport/{report.id}"]["status"] == "amended"
    ImagingStudy.model_validate(pushed[f"/fhir/ImagingStudy/{study}"])
    Patient.model_validate(pushed[f"/fhir/{patient_ref}"])
    for observation in observations:
        Observation.model_validate(pushed[f"/fhir/Observation/{observation.id}"])
