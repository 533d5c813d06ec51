"""The audit trail as JSON, for administrators (a privacy officer's searches).

``GET /api/audit``  records newest first, filtered by ``patient_id``, ``study``
                    (a Study Instance UID), ``user`` (the principal's name: a user, a calling
                    AE title, ``hilum``), ``since`` and ``until`` (ISO 8601, UTC when no offset
                    is given; ``until`` excluded), ``partition``; paged by ``before`` (a
                    record id: the ``next`` of the previous page) and ``limit`` (100, at most
                    1000). Answers ``{"records": [...], "next": id or null}``.

Reading the trail is itself recorded (PS3.15 A.5.3.2 Audit Log Used), before the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, jsonify, request

from server.access import Action, requires
from server.context import http_context
from storage.archive import Archive
from storage.audit import AuditEntry, AuditEvent, AuditSearch, search_records
from storage.errors import InvalidQuery

MAX_LIMIT = 1000


def audit_search(args: Mapping[str, str], *, default_limit: int = 100) -> AuditSearch:
    """The filters of ``/api/audit`` and the audit page from the query string; InvalidQuery
    (400) when one cannot be read."""
    try:
        limit = int(args.get("limit") or default_limit)
        before = int(args["before"]) if args.get("before") else None
    except ValueError:
        raise InvalidQuery("limit and before must be whole numbers") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidQuery(f"limit must be between 1 and {MAX_LIMIT}")
    return AuditSearch(
        patient_id=args.get("patient_id", "").strip(),
        study=args.get("study", "").strip(),
        user=args.get("user", "").strip(),
        since=_moment(args.get("since", ""), "since"),
        until=_moment(args.get("until", ""), "until"),
        partition=args.get("partition", "").strip(),
        before=before,
        limit=limit,
    )


def _moment(value: str, name: str) -> datetime | None:
    value = value.strip()
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidQuery(
            f"{name} must be an ISO 8601 date or time (2026-12-03 or 2026-12-03T14:00), "
            f"not {value[:40]!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def read_audit(archive: Archive, search: AuditSearch, service: str) -> list[dict[str, Any]]:
    """The records ``search`` finds, after recording that the trail was read."""
    asked = {
        name: str(value)
        for name, value in (
            ("patient_id", search.patient_id),
            ("study", search.study),
            ("user", search.user),
            ("since", search.since.isoformat() if search.since else ""),
            ("until", search.until.isoformat() if search.until else ""),
            ("partition", search.partition),
            ("before", search.before or ""),
        )
        if value
    }
    archive.record(
        http_context(),
        AuditEntry(
            AuditEvent.AUDIT_READ,
            patient_id=search.patient_id,
            study_uids=(search.study,) if search.study else (),
            detail={"service": service, **asked},
        ),
    )
    if archive.audit is None:
        return []
    return search_records(archive.audit.index, search)


def audit_blueprint(archive: Archive) -> Blueprint:
    blueprint = Blueprint("audit", __name__)

    @blueprint.get("/audit")
    @requires(Action.ADMIN)
    def search_audit_records() -> Any:
        search = audit_search(request.args)
        records = read_audit(archive, search, "GET /api/audit")
        full_page = len(records) == search.limit
        return jsonify({"records": records, "next": records[-1]["id"] if full_page else None})

    return blueprint
