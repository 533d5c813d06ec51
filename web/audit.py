"""The audit page (``/audit``): who accessed which patient's images, when, from where, and the
outcome, in words a privacy officer reads without knowing DICOM; the same search as
``GET /api/audit`` (``server.api.audit``), newest first, 50 a page."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date, timedelta
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, render_template, request

from server.access import Action, requires
from server.api.audit import audit_search, read_audit
from storage.archive import Archive
from storage.errors import InvalidQuery

PAGE = 50

_KINDS = {
    "ae": "DICOM device (AE title)",
    "user": "user",
    "token": "API token",
    "oidc": "single sign-on user",
    "system": "Hilum itself",
    "anonymous": "anyone (no login on this server)",
}
_TRANSPORTS = {
    "dimse": "DICOM network",
    "http": "web",
    "cli": "command line",
    "worker": "AI worker",
    "internal": "Hilum",
}
_QUERY_WORDS = {
    "PatientName": "patient name",
    "PatientID": "patient ID",
    "StudyInstanceUID": "study",
    "AccessionNumber": "accession",
    "StudyDate": "study date",
    "ModalitiesInStudy": "modality",
    "Modality": "modality",
    "SeriesInstanceUID": "series",
    "ai_state": "AI state",
    "finding": "AI finding",
}


# What a DICOMweb retrieve sent, from its endpoint (server/dicomweb/*.py view names).
_RETRIEVED = (
    ("thumbnail", "a thumbnail"),
    ("rendered", "a rendered image"),
    ("metadata", "image headers (metadata)"),
    ("frames", "image frames"),
    ("bulkdata", "image data"),
    ("wado_uri", "an image (WADO-URI)"),
)


def _images(count: int) -> str:
    return f"{count} image{'s' if count != 1 else ''}"


def describe(record: Mapping[str, Any]) -> dict[str, Any]:
    """One record as the page shows it: what happened, in words."""
    detail = json.loads(record["detail"]) if record["detail"] else {}
    service = detail.get("service", "")
    count = record["instances"]
    event, action = record["event"], record["action"]
    if event == "store-begun":
        what = f"Began storing images ({service})"
    elif event == "store" and service == "C-STORE":
        parts = [
            f"{detail[k]} {label}"
            for k, label in (
                ("stored", "new"),
                ("replaced", "replaced"),
                ("duplicate", "already held"),
                ("refused", "refused"),
            )
            if detail.get(k)
        ]
        what = f"Sent {_images(count)} over DICOM: " + ", ".join(parts)
    elif event == "store":
        verb = {"C": "Stored", "U": "Replaced", "R": "Received again (already stored)"}.get(
            action, "Stored"
        )
        what = f"{verb} {_images(count)}"
        if detail.get("calling_ae_title"):
            what += f" sent by {detail['calling_ae_title']}"
    elif event == "import":
        what = f"Imported {_images(count)} from files"
    elif event == "query":
        asked = json.loads(detail.get("query", "{}") or "{}")
        terms = ", ".join(f"{_QUERY_WORDS.get(k, k)} {v}" for k, v in asked.items())
        what = f"Searched ({service})" + (f": {terms}" if terms else ": everything")
    elif event == "retrieve":
        endpoint = detail.get("endpoint", "")
        kind = next((words for key, words in _RETRIEVED if key in endpoint), "images")
        what = f"Retrieved {_images(count) if count and kind == 'images' else kind} ({service})"
        if detail.get("move_destination"):
            what += f" to {detail['move_destination']}"
    elif event == "view":
        what = "Opened the study page"
    elif event == "delete":
        what = f"Deleted {detail.get('level', 'study')} ({_images(count)})"
    elif event == "audit-read":
        what = "Searched the audit trail"
    elif event == "login":
        what = f"Logged in as {detail.get('user', '')}"
    elif event == "logout":
        what = "Logged out"
    elif event == "export":
        what = f"Exported {_images(count)} to {detail.get('destination', '')}"
    elif event == "deidentified-copy":
        what = f"Copied {_images(count)}, de-identified, to {detail.get('to_partition', '')}"
    else:
        change = f"{detail.get('subject', '')} {detail.get('change', '')}".strip()
        what = f"{event.replace('-', ' ').capitalize()}: {change}"
    return {
        "id": record["id"],
        "when": record["recorded_at"].replace("T", " ")[:19] + " UTC",
        "who": record["principal_name"],
        "who_kind": _KINDS.get(record["principal_kind"], record["principal_kind"]),
        "token": record["token_id"],
        "address": record["address"],
        "channel": _TRANSPORTS.get(record["transport"], record["transport"]),
        "what": what,
        "patient_id": record["patient_id"],
        "studies": [uid for uid in record["study_uids"].split("\\") if uid],
        "partition": record["partition"],
        "ok": record["outcome"] == 0,
        "reason": record["reason"],
        "request_id": record["request_id"],
    }


def _next_day(day: str) -> str:
    try:
        return (date.fromisoformat(day) + timedelta(days=1)).isoformat()
    except ValueError:
        return day  # audit_search says what is wrong with it


def register(blueprint: Blueprint, archive: Archive) -> None:
    @blueprint.get("/audit")
    @requires(Action.ADMIN)
    def audit_page() -> Any:
        args = request.args
        filters = {k: args.get(k, "") for k in ("patient_id", "study", "user", "since", "until")}
        asked = dict(args)
        if len(filters["until"]) == 10:  # a day from the date picker: that day included
            asked["until"] = _next_day(filters["until"])
        try:
            search = audit_search(asked, default_limit=PAGE)
        except InvalidQuery as error:
            return render_template(
                "audit.html", nav="audit", filters=filters, rows=[], error=str(error)
            ), 400
        records = read_audit(archive, search, "audit page")
        older = None
        if len(records) == search.limit:
            older = "/audit?" + urlencode(
                {**{k: v for k, v in filters.items() if v}, "before": records[-1]["id"]}
            )
        return render_template(
            "audit.html",
            nav="audit",
            filters=filters,
            rows=[describe(r) for r in records],
            older=older,
            error=None,
        )
