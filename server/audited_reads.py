"""The reads of the JSON API and of FHIR in the audit trail (issue 13): one Query record
(PS3.15 A.5.3.10) per request, with what it asked (its path's study, its query parameters),
written before the answer like every other read; a failure to write it refuses the request
(503). DICOMweb, the worklist and DIMSE record their reads themselves, with their own keys."""

from __future__ import annotations

from flask import Blueprint, current_app, request

from server.access import Action, required_action
from server.context import http_context
from server.partitions import request_archive
from storage.audit import query_entry

# URL variables that name a study.
_STUDY_VARIABLES = ("study_instance_uid", "study", "resource_id")


def record_reads(blueprint: Blueprint, service: str) -> None:
    """Record every GET of ``blueprint``'s routes as a query by ``service``."""

    @blueprint.before_request
    def _record_read() -> None:
        if request.method not in ("GET", "HEAD"):
            return
        view = current_app.view_functions.get(request.endpoint or "")
        if view is None or required_action(view) is Action.PUBLIC:
            return  # e.g. FHIR's CapabilityStatement: no patient data
        matching = {key: value for key, value in request.args.items() if key != "_"}
        for name in _STUDY_VARIABLES:
            value = (request.view_args or {}).get(name)
            if isinstance(value, str) and value[:1].isdigit():  # a UID, not a FHIR id
                matching["StudyInstanceUID"] = value
        request_archive().record(
            http_context(), query_entry("API", matching, service=service, resource=request.path)
        )
