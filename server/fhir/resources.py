"""FHIR R4 resources built from the index with ``fhir.resources`` (its R4B models: ImagingStudy,
DiagnosticReport, Observation and Patient are the same in R4 4.0.1 and R4B 4.3.0). Each
builder validates through the library's constructor, so an invalid resource cannot leave.

- ``ImagingStudy/{StudyInstanceUID}``: series, instances, modalities, the study's DICOMweb
  endpoint (a contained Endpoint, ``dicom-wado-rs``, at ``<base>/dicomweb``).
- ``DiagnosticReport/ai-{job id}``: one per done AI job. ``status`` follows the reviewers'
  current decisions on its findings: ``preliminary`` while none is reviewed, ``final`` once
  one is accepted and none rejected, ``amended`` once one is rejected.
- ``Observation/{Tracking UID}``: one per finding of the job's TID 1500 SR: the finding's code,
  body site, size as a UCUM quantity (or present/absent), the model and version as ``method``
  and ``device``, ``derivedFrom`` the ImagingStudy.
- ``Patient/patient-{row id}``: identifier (Patient ID, its issuer), name, sex, birth date.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from typing import Any

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

from storage.fhir import FindingRecord, PatientRecord, ReportRecord, StudyRecord

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
# DICOM coding schemes (PS3.16 8) -> FHIR code systems (FHIR R4 "Using Codes", DICOM's table).
_SYSTEMS = {"SCT": SNOMED, "DCM": DCM, "LN": LOINC, "UCUM": UCUM}
_SEX = {"M": "male", "F": "female", "O": "other"}


def patient_id(record: PatientRecord) -> str:
    return f"patient-{record.pk}"


def report_id(job_id: int) -> str:
    return f"ai-{job_id}"


def _instant(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _meta(updated: datetime) -> dict[str, Any]:
    return {"lastUpdated": _instant(updated)}


def _oid(uid: str) -> str:
    return f"urn:oid:{uid}"


def _dicom_date(value: str) -> date | None:
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except (ValueError, IndexError):
        return None


def _study_started(study: StudyRecord) -> str | None:
    day = _dicom_date(study.study_date)
    if day is None:
        return None
    digits = "".join(c for c in study.study_time.split(".")[0] if c.isdigit())
    try:
        moment = time(int(digits[:2] or 0), int(digits[2:4] or 0), int(digits[4:6] or 0))
    except ValueError:
        moment = time()
    # DICOM study times carry no time zone (unless Timezone Offset From UTC is sent): a date
    # time without zone is not a FHIR dateTime with time, so only the date is given then.
    return day.isoformat() if not digits else f"{day.isoformat()}T{moment.isoformat()}Z"


def build_patient(record: PatientRecord) -> Patient:
    resource: dict[str, Any] = {"resourceType": "Patient", "id": patient_id(record)}
    if record.patient_id:
        identifier: dict[str, Any] = {"value": record.patient_id}
        if record.issuer:
            identifier["assigner"] = {"display": record.issuer}
        resource["identifier"] = [identifier]
    if record.name:
        parts = record.name.split("=")[0].split("^")  # the alphabetic group (PS3.5 6.2.1)
        name: dict[str, Any] = {"text": " ".join(p for p in parts[1:3] + parts[:1] if p)}
        if parts[0]:
            name["family"] = parts[0]
        given = [p for p in parts[1:3] if p]
        if given:
            name["given"] = given
        resource["name"] = [name]
    if record.sex in _SEX:
        resource["gender"] = _SEX[record.sex]
    elif record.sex:
        resource["gender"] = "unknown"
    birth = _dicom_date(record.birth_date)
    if birth is not None:
        resource["birthDate"] = birth.isoformat()
    return Patient.model_validate(resource)


def build_imaging_study(study: StudyRecord, base_url: str) -> ImagingStudy:
    modalities = sorted({s.modality for s in study.series if s.modality})
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": study.study_instance_uid,
        "meta": _meta(study.last_updated),
        "contained": [
            {
                "resourceType": "Endpoint",
                "id": "dicomweb",
                "status": "active",
                "connectionType": {
                    "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                    "code": "dicom-wado-rs",
                },
                "payloadType": [{"text": "DICOM"}],
                "payloadMimeType": ["application/dicom"],
                "address": f"{base_url.rstrip('/')}/dicomweb",
            }
        ],
        "identifier": [{"system": "urn:dicom:uid", "value": _oid(study.study_instance_uid)}],
        "status": "available",
        "subject": {"reference": f"Patient/{patient_id(study.patient)}"},
        "endpoint": [{"reference": "#dicomweb"}],
        "numberOfSeries": len(study.series),
        "numberOfInstances": sum(len(s.instances) for s in study.series),
    }
    if study.accession_number:
        resource["identifier"].append(
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                    ]
                },
                "value": study.accession_number,
            }
        )
    if modalities:
        resource["modality"] = [{"system": DCM, "code": m} for m in modalities]
    started = _study_started(study)
    if started:
        resource["started"] = started
    if study.description:
        resource["description"] = study.description
    series = []
    for s in study.series:
        entry: dict[str, Any] = {
            "uid": s.series_instance_uid,
            "modality": {"system": DCM, "code": s.modality or "OT"},
            "numberOfInstances": len(s.instances),
            "endpoint": [{"reference": "#dicomweb"}],
            "instance": [
                {
                    "uid": i.sop_instance_uid,
                    "sopClass": {"system": "urn:ietf:rfc:3986", "code": _oid(i.sop_class_uid)},
                    **({"number": i.number} if i.number is not None and i.number >= 0 else {}),
                }
                for i in s.instances
            ],
        }
        if s.number is not None and s.number >= 0:
            entry["number"] = s.number
        if s.description:
            entry["description"] = s.description
        if s.body_part:
            entry["bodySite"] = {"display": s.body_part}
        series.append(entry)
    if series:
        resource["series"] = series
    return ImagingStudy.model_validate(resource)


def _status(decisions: list[str | None]) -> str:
    if "rejected" in decisions:
        return "amended"
    if "accepted" in decisions:
        return "final"
    return "preliminary"


def report_status(report: ReportRecord) -> str:
    """preliminary until a reviewer accepts a finding, final once accepted, amended once one
    is rejected (the reviewers' current decisions, ``storage/reviews.py``)."""
    return _status([f.decision for f in report.findings])


def _code(finding: FindingRecord) -> dict[str, Any]:
    scheme, _, value = finding.finding_code.partition(":")
    coding = {
        "system": _SYSTEMS.get(scheme, f"urn:dicom:coding-scheme:{scheme}"),
        "code": value or finding.finding_code,
        "display": finding.finding,
    }
    return {"coding": [coding], "text": finding.finding}


def _method(report: ReportRecord) -> str:
    return f"Hilum AI model {report.model_name} {report.model_version}"


def build_observation(report: ReportRecord, finding: FindingRecord) -> Observation:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": finding.tracking_uid,
        "meta": _meta(finding.decided_at or report.finished_at),
        "identifier": [{"system": "urn:dicom:uid", "value": _oid(finding.tracking_uid)}],
        "status": _status([finding.decision]),
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                    }
                ]
            }
        ],
        "code": _code(finding),
        "subject": {"reference": f"Patient/{patient_id(report.patient)}"},
        "effectiveDateTime": _instant(report.finished_at),
        "issued": _instant(report.finished_at),
        "method": {"text": _method(report)},
        "device": {"display": _method(report)},
        "derivedFrom": [{"reference": f"ImagingStudy/{report.study_instance_uid}"}],
    }
    if finding.site:
        resource["bodySite"] = {"text": finding.site}
    if finding.present and finding.size is not None and finding.size_unit:
        resource["valueQuantity"] = {
            "value": finding.size,
            "unit": finding.size_unit,
            "system": UCUM,
            "code": finding.size_unit,
        }
    else:
        # SNOMED CT 52101004 |Present|, 2667000 |Absent| (DICOM CID 240).
        code, display = ("52101004", "Present") if finding.present else ("2667000", "Absent")
        resource["valueCodeableConcept"] = {
            "coding": [{"system": SNOMED, "code": code, "display": display}]
        }
    return Observation.model_validate(resource)


def build_diagnostic_report(report: ReportRecord) -> DiagnosticReport:
    present = sum(f.present for f in report.findings)
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id(report.job_id),
        "meta": _meta(report.last_updated),
        "status": report_status(report),
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],
        # LOINC 18748-4 Diagnostic imaging study.
        "code": {"coding": [{"system": LOINC, "code": "18748-4"}], "text": _method(report)},
        "subject": {"reference": f"Patient/{patient_id(report.patient)}"},
        "effectiveDateTime": _instant(report.finished_at),
        "issued": _instant(report.finished_at),
        "performer": [{"display": _method(report)}],
        "imagingStudy": [{"reference": f"ImagingStudy/{report.study_instance_uid}"}],
        "conclusion": f"{present} finding(s) present ({_method(report)}; not reviewed findings "
        "are preliminary)",
    }
    if report.report_sop_instance_uid:
        resource["identifier"] = [
            {"system": "urn:dicom:uid", "value": _oid(report.report_sop_instance_uid)}
        ]
    if report.findings:
        resource["result"] = [
            {"reference": f"Observation/{finding.tracking_uid}"} for finding in report.findings
        ]
    return DiagnosticReport.model_validate(resource)
