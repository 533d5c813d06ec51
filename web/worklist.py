"""The worklist page (``/``): the filter form read into a :class:`storage.worklist.WorklistRequest`,
the table, and the rows alone (``/worklist/rows``) that the page polls to refresh itself."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, render_template, request

from config import Settings
from server.access import Action, requires
from server.context import http_context
from server.partitions import request_archive, request_root
from storage.audit import AuditEvent, query_entry, refusal_entry
from storage.errors import InvalidQuery
from storage.worklist import (
    AI_STATE_LABELS,
    AIState,
    SortKey,
    WorklistPage,
    WorklistRequest,
    search_worklist,
)

# The filter form's fields, as they appear in the URL (so that a filtered list is a bookmark).
FILTER_FIELDS = (
    "name", "patient_id", "accession", "date_from", "date_to", "modality", "ai", "finding",
)  # fmt: skip
MODALITIES = ("CT", "MR", "CR", "DX", "US", "MG", "NM", "PT", "XA", "RF", "SM", "SEG", "SR", "OT")
COLUMNS = (
    ("patient_name", "Patient"),
    ("patient_id", "Patient ID"),
    ("study_date", "Study date"),
    ("accession", "Accession"),
    ("modality", "Modalities"),
    ("received", "Received"),
)
PAGE_SIZE, MAX_PAGE_SIZE = 50, 200
_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


def _wild(value: str) -> str:
    """Typed text as a DICOM matching value: as typed when it holds a wild card, else a
    prefix match (PS3.4 C.2.2.2.4), which the patient-name index serves."""
    value = value.strip()
    if not value or "*" in value or "?" in value:
        return value
    return value + "*"


def _date(value: str, label: str) -> str:
    match = _DATE.match(value.strip())
    if not match:
        raise InvalidQuery(f"{label}: {value!r} is not a date (YYYY-MM-DD)")
    return "".join(match.groups())


def worklist_request(args: Any, settings: Settings) -> WorklistRequest:
    """The form's values as a worklist request; :class:`InvalidQuery` says which one is wrong."""
    matching: dict[str, str] = {}
    if args.get("name", "").strip():
        matching["PatientName"] = _wild(args["name"])
    if args.get("patient_id", "").strip():
        matching["PatientID"] = args["patient_id"].strip()
    if args.get("accession", "").strip():
        matching["AccessionNumber"] = args["accession"].strip()
    low = _date(args["date_from"], "From") if args.get("date_from", "").strip() else ""
    high = _date(args["date_to"], "To") if args.get("date_to", "").strip() else ""
    if low or high:
        matching["StudyDate"] = f"{low}-{high}"  # PS3.4 C.2.2.2.5 range matching
    if args.get("modality", "").strip():
        matching["ModalitiesInStudy"] = args["modality"].strip().upper()
    try:
        ai_state = AIState(args["ai"]) if args.get("ai") else None
        sort = SortKey(args.get("sort") or SortKey.RECEIVED)
        limit = int(args.get("limit") or PAGE_SIZE)
    except ValueError as error:
        raise InvalidQuery(str(error)) from None
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidQuery(f"limit: {limit} is not between 1 and {MAX_PAGE_SIZE}")
    return WorklistRequest(
        matching=matching,
        ai_state=ai_state,
        finding=args.get("finding", "").strip() or None,
        sort=sort,
        descending=args.get("order", "desc") != "asc",
        cursor=args.get("cursor") or None,
        limit=limit,
        case_insensitive_person_names=settings.query.case_insensitive_person_names,
    )


def _filters(args: Any) -> dict[str, str]:
    """What a sort, page or refresh link keeps of the request: the filters and page size."""
    return {field: args[field] for field in (*FILTER_FIELDS, "limit") if args.get(field)}


def _context(args: Any, page: WorklistPage | None, error: str | None) -> dict[str, Any]:
    filters = _filters(args)
    sort, order = args.get("sort") or "received", args.get("order") or "desc"

    def sort_url(column: str) -> str:
        flipped = "asc" if sort == column and order == "desc" else "desc"
        return request_root() + "/?" + urlencode({**filters, "sort": column, "order": flipped})

    base = {**filters, "sort": sort, "order": order}
    return {
        "page": page,
        "error": error,
        "args": args,
        "filters": filters,
        "sort": sort,
        "order": order,
        "columns": COLUMNS,
        "sort_url": sort_url,
        "first_url": request_root() + "/?" + urlencode(base),
        "next_url": (
            request_root() + "/?" + urlencode({**base, "cursor": page.next_cursor})
            if page and page.next_cursor
            else None
        ),
        "rows_url": request_root()
        + "/worklist/rows?"
        + urlencode({**base, "cursor": args.get("cursor", "")}),
        "modalities": MODALITIES,
        "ai_states": AI_STATE_LABELS,
    }


def register(blueprint: Blueprint, settings: Settings) -> None:
    def _page() -> tuple[WorklistPage | None, str | None]:
        archive = request_archive()
        endpoint = request.endpoint or ""
        service = "worklist refresh" if endpoint.endswith("worklist_rows") else "worklist"
        try:
            wanted = worklist_request(request.args, settings)
        except InvalidQuery as error:
            entry = refusal_entry(AuditEvent.QUERY, error, service=service, resource=request.path)
            archive.record_refusal(http_context(), entry)
            return None, str(error)
        matching = dict(wanted.matching)
        if wanted.ai_state is not None:
            matching["ai_state"] = wanted.ai_state.value
        if wanted.finding:
            matching["finding"] = wanted.finding
        # Recorded before the page is rendered (PS3.15 A.5.3.10 Query).
        archive.record(http_context(), query_entry("STUDY", matching, service=service))
        try:
            return search_worklist(archive, wanted), None
        except InvalidQuery as error:
            return None, str(error)

    @blueprint.get("/")
    @requires(Action.QUERY)
    def worklist() -> Any:
        page, error = _page()
        return render_template("worklist.html", **_context(request.args, page, error)), (
            400 if error else 200
        )

    @blueprint.get("/worklist/rows")
    @requires(Action.QUERY)
    def worklist_rows() -> Any:
        page, error = _page()
        return render_template("worklist_rows.html", **_context(request.args, page, error)), (
            400 if error else 200
        )
