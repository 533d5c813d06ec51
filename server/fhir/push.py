"""``[fhir] push_url``: the FHIR resources PUT to the hospital's FHIR server, as a subscriber of
the change feed (``fhir-push``), so with the feed's order, retries, back-off and dead letters.

``study.stable`` → Patient and ImagingStudy; ``ai.completed`` and ``ai.reviewed`` → Patient,
ImagingStudy, the job's Observations and its DiagnosticReport (with its new status). Each is an
update-as-create ``PUT {push_url}/{type}/{id}`` (FHIR R4 3.1.0.4), so a repeated delivery
writes the same resource again. Resources that no longer exist (the study was deleted since)
are skipped.
"""

from __future__ import annotations

from typing import Any

import urllib3

from config import Settings
from server.events.webhooks import DeliveryError
from server.fhir.resources import (
    build_diagnostic_report,
    build_imaging_study,
    build_observation,
    build_patient,
)
from storage.archive import Archive
from storage.events import ChangeEvent, EventType
from storage.fhir import find_reports, find_studies

_TYPES = {EventType.STUDY_STABLE, EventType.AI_COMPLETED, EventType.AI_REVIEWED}


class FhirPushSubscriber:
    name = "fhir-push"

    def __init__(self, settings: Settings, archive: Archive, http: urllib3.PoolManager) -> None:
        self._url = settings.fhir.push_url.rstrip("/")
        self._base = (
            settings.fhir.public_url or f"http://{settings.server.host}:{settings.http.port}"
        )
        self._archive = archive
        self._http = http
        self._timeout = urllib3.Timeout(connect=5.0, read=settings.events.timeout_s)

    def wants(self, event: ChangeEvent) -> bool:
        return event.type in _TYPES

    def resources(self, event: ChangeEvent) -> list[Any]:
        archive = self._archive.scoped(event.partition)
        studies = find_studies(archive, study_instance_uids=[event.study_instance_uid])
        if not studies:
            return []
        (study,) = studies
        resources: list[Any] = [
            build_patient(study.patient),
            build_imaging_study(study, self._base),
        ]
        if event.type == EventType.STUDY_STABLE:
            return resources
        job = event.payload.get("job")
        if not isinstance(job, int):
            return resources
        for report in find_reports(archive, job_ids=[job]):
            resources += [build_observation(report, f) for f in report.findings]
            resources.append(build_diagnostic_report(report))
        return resources

    def deliver(self, event: ChangeEvent) -> None:
        for resource in self.resources(event):
            url = f"{self._url}/{resource.get_resource_type()}/{resource.id}"
            try:
                response = self._http.request(
                    "PUT",
                    url,
                    body=resource.model_dump_json().encode(),
                    headers={
                        "Content-Type": "application/fhir+json",
                        "Accept": "application/fhir+json",
                    },
                    timeout=self._timeout,
                    retries=False,
                    redirect=False,
                )
            except urllib3.exceptions.HTTPError as error:
                raise DeliveryError(f"FHIR server: no answer: {type(error).__name__}") from None
            if not 200 <= response.status < 300:
                raise DeliveryError(
                    f"FHIR server: PUT {resource.get_resource_type()}/{resource.id}: HTTP "
                    f"{response.status} {response.data[:200]!r}"
                )
