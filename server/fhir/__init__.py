"""Read-only FHIR R4 at ``/fhir`` (``application/fhir+json``).

``GET /fhir/metadata``                      the CapabilityStatement
``GET /fhir/{type}/{id}``                   one ImagingStudy, DiagnosticReport, Observation,
                                            Patient (404 OperationOutcome when none)
``GET /fhir/{type}?…``                      a searchset Bundle (at most 500 entries), by
    ``_id``, ``patient`` / ``subject`` (``patient-N`` or ``Patient/patient-N``),
    ``_lastUpdated`` (``gt``/``ge``/``lt``/``le`` + a FHIR dateTime; a bare date: that day),
    ``_count`` (the first N entries; ``total`` counts all; no paging links),
    ``identifier`` (ImagingStudy: ``urn:oid:<StudyInstanceUID>``, with or without
    ``urn:dicom:uid|``; DiagnosticReport: its SR's ``urn:oid:<SOP Instance UID>``; Patient:
    the Patient ID), ``study`` (DiagnosticReport, Observation: a StudyInstanceUID; Hilum's own
    parameter), ``status`` (DiagnosticReport, Observation)

An unknown parameter or type is a 400 OperationOutcome (FHIR R4 3.1.1.5.7 "strict" handling),
so a client never mistakes an ignored filter for an empty answer.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from flask import Blueprint, Flask, Response, request

from config import Settings
from server.access import Action, requires
from server.audited_reads import record_reads
from server.fhir.resources import (
    build_diagnostic_report,
    build_imaging_study,
    build_observation,
    build_patient,
    report_id,
)
from server.partitions import PARTITION_ROOT, request_archive, request_root
from storage.archive import Archive
from storage.dicom_file import is_valid_uid
from storage.errors import StorageError
from storage.fhir import (
    MAX_RESULTS,
    find_patients,
    find_reports,
    find_studies,
    get_patient,
    job_ids_of,
)

FHIR_JSON = "application/fhir+json"
_COMMON = {"_id", "patient", "subject", "_lastUpdated", "_count", "_format"}
# Entries of a searchset when _count does not say (each ImagingStudy lists all its instances).
DEFAULT_COUNT = 50
SEARCH_PARAMETERS = {
    "ImagingStudy": _COMMON | {"identifier"},
    "DiagnosticReport": _COMMON | {"identifier", "study", "status"},
    "Observation": _COMMON | {"study", "status"},
    "Patient": {"_id", "identifier", "_lastUpdated", "_count", "_format"},
}


class FhirError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _response(resource: Any, status: int = 200) -> Response:
    body = resource if isinstance(resource, str) else resource.model_dump_json()
    return Response(body, status=status, mimetype=FHIR_JSON)


def _outcome(status: int, code: str, message: str) -> Response:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": message}],
    }
    return Response(json.dumps(outcome), status=status, mimetype=FHIR_JSON)


def base_url(settings: Settings) -> str:
    """Hilum's base URL for the resources' endpoints: ``[fhir] public_url``, else this
    request's; then the request's partition root (its DICOMweb is ``<base>/dicomweb``)."""
    return (settings.fhir.public_url or request.host_url).rstrip("/") + request_root()


def _patient_pk(value: str) -> int:
    reference = value.removeprefix("Patient/")
    if not reference.startswith("patient-") or not reference[8:].isdigit():
        raise FhirError(
            400, "invalid", f"patient must be patient-N or Patient/patient-N, not {value[:80]!r}"
        )
    pk = int(reference[8:])
    if pk >= 2**63:
        raise FhirError(400, "invalid", "no such patient id")
    return pk


def _updated_filter(values: list[str]) -> tuple[Any, datetime | None]:
    """A test of a resource's lastUpdated, and the earliest time it can pass (for SQL)."""
    bounds: list[tuple[str, datetime]] = []
    for value in values:
        prefix = value[:2] if value[:2] in ("gt", "ge", "lt", "le", "eq") else ""
        text = value[len(prefix) :]
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise FhirError(
                400, "invalid", f"_lastUpdated {value[:40]!r} is not a FHIR dateTime"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        if prefix in ("", "eq") and len(text) == 10:  # a whole day
            bounds += [("ge", moment), ("lt", moment + timedelta(days=1))]
        elif prefix in ("", "eq"):  # that instant
            bounds += [("ge", moment), ("le", moment)]
        else:
            bounds.append((prefix, moment))
    tests = {
        "gt": lambda a, b: a > b,
        "ge": lambda a, b: a >= b,
        "lt": lambda a, b: a < b,
        "le": lambda a, b: a <= b,
    }
    lower = max((m for p, m in bounds if p in ("gt", "ge")), default=None)
    return (lambda updated: all(tests[p](updated, m) for p, m in bounds)), lower


def fhir_blueprint(settings: Settings) -> Blueprint:
    blueprint = Blueprint("fhir", __name__)
    scoped = request_archive  # the request's partition's archive

    @blueprint.errorhandler(FhirError)
    def _fhir_error(error: FhirError) -> Response:
        return _outcome(error.status, error.code, str(error))

    @blueprint.errorhandler(StorageError)
    def _storage_error(error: StorageError) -> Response:
        from server.dicomweb.statuses import http_status_for

        return _outcome(http_status_for(error), "exception", str(error))

    @blueprint.get("/metadata")
    @requires(Action.PUBLIC)
    def capability_statement() -> Response:
        return _response(capabilities(base_url(settings)))

    @blueprint.get("/<resource_type>/<resource_id>")
    @requires(Action.QUERY)
    def read(resource_type: str, resource_id: str) -> Response:
        found = search(
            scoped(), settings, resource_type, {"_id": [resource_id]}, base_url(settings)
        )
        if not found:
            raise FhirError(404, "not-found", f"no {resource_type}/{resource_id[:80]}")
        return _response(found[0])

    @blueprint.get("/<resource_type>")
    @requires(Action.QUERY)
    def search_type(resource_type: str) -> Response:
        parameters = {key: request.args.getlist(key) for key in request.args}
        base = base_url(settings)
        try:
            count = int(parameters.get("_count", [DEFAULT_COUNT])[0])
        except ValueError:
            raise FhirError(400, "invalid", "_count must be an integer") from None
        count = max(0, min(count, MAX_RESULTS))
        # One more than asked: whether there were more (then no total: it is not known).
        found = search(scoped(), settings, resource_type, parameters, base, limit=count + 1)
        total = len(found) if len(found) <= count else None
        found = found[:count]
        bundle = Bundle.model_validate(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                **({"total": total} if total is not None else {}),
                "link": [{"relation": "self", "url": request.url}],
                "entry": [
                    {
                        "fullUrl": f"{base}/fhir/{resource_type}/{resource.id}",
                        "resource": resource,
                        "search": {"mode": "match"},
                    }
                    for resource in found
                ],
            }
        )
        return _response(bundle)

    return blueprint


def search(
    archive: Archive,
    settings: Settings,
    resource_type: str,
    parameters: dict[str, list[str]],
    base: str,
    *,
    limit: int = MAX_RESULTS,
) -> list[Any]:
    """The resources of ``resource_type`` matching every parameter (AND), built and valid;
    ImagingStudy: at most ``limit``."""
    allowed = SEARCH_PARAMETERS.get(resource_type)
    if allowed is None:
        raise FhirError(
            404,
            "not-supported",
            f"Hilum serves {', '.join(SEARCH_PARAMETERS)}, not {resource_type[:40]!r}",
        )
    unknown = sorted(set(parameters) - allowed)
    if unknown:
        raise FhirError(
            400,
            "not-supported",
            f"{resource_type} cannot be searched by {unknown[0]!r}; "
            f"by {', '.join(sorted(allowed))}",
        )
    patient = None
    for key in ("patient", "subject"):
        for value in parameters.get(key, []):
            pk = _patient_pk(value)
            if patient is not None and pk != patient:
                return []
            patient = pk
    ids = parameters.get("_id")
    updated, updated_after = _updated_filter(parameters.get("_lastUpdated", []))
    found: list[Any]
    if resource_type == "Patient":
        if ids:
            pks = [int(i[8:]) for i in ids if i.startswith("patient-") and i[8:].isdigit()]
            pks = [pk for pk in pks if pk < 2**63]
            records = [r for r in (get_patient(archive, pk) for pk in pks) if r is not None]
        else:
            identifier = parameters["identifier"][0] if parameters.get("identifier") else None
            records = find_patients(
                archive, identifier=identifier.split("|")[-1] if identifier else None
            )
        return [build_patient(record) for record in records]
    if resource_type == "ImagingStudy":
        uids = list(ids or [])
        for value in parameters.get("identifier", []):
            uids.append(value.split("|")[-1].removeprefix("urn:oid:"))
        if any(not is_valid_uid(uid) for uid in uids):
            return []
        studies = find_studies(
            archive,
            study_instance_uids=uids or None,
            patient_pk=patient,
            updated_after=updated_after,
            limit=limit,
        )
        found = [
            build_imaging_study(study, base) for study in studies if updated(study.last_updated)
        ]
        return found
    # DiagnosticReport and Observation: from the done AI jobs.
    studies_wanted = parameters.get("study")
    job_ids = None
    if resource_type == "Observation" and ids:
        job_ids = job_ids_of(archive, tracking_uids=ids)
        if not job_ids:
            return []
    identifiers = [
        v.split("|")[-1].removeprefix("urn:oid:") for v in parameters.get("identifier", [])
    ]
    if resource_type == "DiagnosticReport" and identifiers:
        job_ids = job_ids_of(archive, report_uids=identifiers)
        if not job_ids:
            return []
    if resource_type == "DiagnosticReport" and ids:
        named = [
            int(i[3:])
            for i in ids
            if i.startswith("ai-") and i[3:].isdigit() and int(i[3:]) < 2**63
        ]
        job_ids = named if job_ids is None else sorted(set(job_ids) & set(named))
        if not job_ids:
            return []
    reports = find_reports(
        archive, job_ids=job_ids, study_instance_uids=studies_wanted, patient_pk=patient
    )
    statuses = set(parameters.get("status", []))
    if resource_type == "DiagnosticReport":
        found = []
        for report in reports:
            resource = build_diagnostic_report(report)
            if not updated(report.last_updated):
                continue
            if statuses and resource.status not in statuses:
                continue
            found.append(resource)
        return found
    found = []
    for report in reports:
        for finding in report.findings:
            if ids and finding.tracking_uid not in ids:
                continue
            observation = build_observation(report, finding)
            if statuses and observation.status not in statuses:
                continue
            if not updated(finding.decided_at or report.finished_at):
                continue
            found.append(observation)
    return found


def capabilities(base: str) -> CapabilityStatement:
    resources = []
    for name, parameters in SEARCH_PARAMETERS.items():
        resources.append(
            {
                "type": name,
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": [
                    {"name": p, "type": _PARAMETER_TYPES.get(p, "token")}
                    for p in sorted(parameters - {"_count", "_format"})
                ],
            }
        )
    return CapabilityStatement.model_validate(
        {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2026-12-03",
            "kind": "instance",
            "software": {"name": "Hilum"},
            "implementation": {"description": "Hilum PACS, read-only FHIR", "url": f"{base}/fhir"},
            # The R4B (4.3.0) models, whose ImagingStudy, DiagnosticReport, Observation and
            # Patient are R4's (4.0.1).
            "fhirVersion": "4.3.0",
            "format": [FHIR_JSON],
            "rest": [{"mode": "server", "resource": resources}],
        }
    )


_PARAMETER_TYPES = {
    "patient": "reference",
    "subject": "reference",
    "_lastUpdated": "date",
    "study": "token",
}


def register_fhir(app: Flask, settings: Settings) -> None:
    """At ``/fhir`` (the default partition) and ``/partitions/{name}/fhir``."""
    blueprint = fhir_blueprint(settings)
    record_reads(blueprint, "FHIR")
    app.register_blueprint(blueprint, url_prefix="/fhir")
    app.register_blueprint(blueprint, url_prefix=PARTITION_ROOT + "/fhir", name="partition_fhir")


__all__ = ["register_fhir", "report_id"]
