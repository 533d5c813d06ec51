"""QIDO-RS, Search Transaction (PS3.18 10.6): studies, series and instances, answered from the
index by ``storage.query`` and streamed as DICOM JSON (PS3.18 F.2)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from itertools import chain
from typing import Any

from flask import Blueprint, Response, request, stream_with_context
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from config import Settings
from server.access import Action, requires
from server.context import http_context
from server.dicomweb import urls
from server.dicomweb.media_types import DICOM_JSON
from server.dicomweb.statuses import warning_text
from server.partitions import request_archive
from storage.archive import Archive
from storage.audit import AuditEvent, query_entry, refusal_entry
from storage.errors import InvalidQuery, StorageError
from storage.query import QUERY_KEYS, Query, QueryLevel, search

# PS3.18 Tables 10.6.3-3, -4 and -5: the attributes returned without includefield.
DEFAULT_RETURN_KEYS = {
    QueryLevel.STUDY: [
        "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
        "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ],
    QueryLevel.SERIES: [
        "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
    ],
    QueryLevel.IMAGE: ["SOPClassUID", "SOPInstanceUID", "InstanceNumber", "NumberOfFrames"],
}  # fmt: skip
_LEVEL_ORDER = [QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE]
_SEARCH_PARAMETERS = {"includefield", "fuzzymatching", "limit", "offset"}
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_RETRIEVE_URL, _INSTANCE_AVAILABILITY = "00081190", "00080056"
_DIGITS = re.compile(r"[0-9]+")
# Keys that only tell the client something (PS3.18 8.3.4): accepted and ignored.
_IGNORED_PARAMETERS = {"charset", "accept"}


class SearchForm:
    """The query parameters of one QIDO-RS request, validated (PS3.18 8.3.4)."""

    def __init__(self, level: QueryLevel, settings: Settings, path_keys: dict[str, str]) -> None:
        self.level = level
        self.warnings: list[str] = []
        matching: dict[str, str] = dict(path_keys)
        include: list[str] = []
        include_all = False
        case_insensitive = settings.query.case_insensitive_person_names
        limit: int | None = None
        offset = 0
        for name, value in request.args.items(multi=True):
            lowered = name.lower()
            if lowered == "includefield":
                for field in filter(None, (f.strip() for f in value.split(","))):
                    if field == "all":
                        include_all = True
                    else:
                        include.append(self._attribute(field, "includefield"))
            elif lowered == "fuzzymatching":
                if value.lower() not in ("true", "false"):
                    raise InvalidQuery(f"fuzzymatching must be true or false, not {value!r}")
                # PS3.18 8.3.4.1: fuzzy matching of Person Names; Hilum ignores case.
                case_insensitive = case_insensitive or value.lower() == "true"
            elif lowered in ("limit", "offset"):
                number = _non_negative(lowered, value)
                if lowered == "limit":
                    limit = number
                else:
                    offset = number
            elif lowered in _IGNORED_PARAMETERS:
                continue
            elif "." in name:
                self.warnings.append(f"matching on the sequence attribute {name} is not supported")
            else:
                keyword = self._attribute(name, "matching key")
                if keyword in path_keys and value != path_keys[keyword]:
                    raise InvalidQuery(f"{keyword} in the query contradicts the URL")
                if keyword not in QUERY_KEYS:
                    self.warnings.append(f"{keyword} is not indexed; it was not used to match")
                    include.append(keyword)
                    continue
                if QUERY_KEYS[keyword].vr == "UI":
                    # PS3.18 8.3.4.1: a list of UIDs is separated by commas (or backslashes).
                    value = value.replace(",", "\\")
                matching[keyword] = value
        returned = list(DEFAULT_RETURN_KEYS[level])
        if level != QueryLevel.STUDY and "StudyInstanceUID" not in path_keys:
            # PS3.18 10.6.3.3.1: without a study in the URL, study attributes come too.
            returned += DEFAULT_RETURN_KEYS[QueryLevel.STUDY]
        if include_all:
            depth = _LEVEL_ORDER.index(level)
            returned += [
                k for k, key in QUERY_KEYS.items() if key.level in _LEVEL_ORDER[: depth + 1]
            ]
        self.extra_keys = [k for k in dict.fromkeys(include) if k not in QUERY_KEYS]
        self.query = Query(
            level=level,
            matching=matching,
            return_keys=list(dict.fromkeys([*returned, *include])),
            case_insensitive_person_names=case_insensitive,
            limit=limit,
            offset=offset,
        )

    @staticmethod
    def _attribute(name: str, what: str) -> str:
        """A keyword from a keyword or an eight-digit tag (PS3.18 8.3.4.1)."""
        if _TAG.match(name):
            keyword = keyword_for_tag(int(name, 16))
            if keyword:
                return keyword
        elif tag_for_keyword(name) is not None:
            return name
        raise InvalidQuery(f"{what} {name[:80]!r} is not a DICOM attribute keyword or tag")


# The largest OFFSET / LIMIT the index's SQL takes (a signed 64-bit integer).
_MAX_SQL_INTEGER = 2**63 - 1


def _non_negative(name: str, value: str) -> int:
    text = value.strip()
    if not _DIGITS.fullmatch(text):
        if text.startswith("-") and _DIGITS.fullmatch(text[1:]):
            raise InvalidQuery(f"{name} must not be negative")
        raise InvalidQuery(f"{name} must be a whole number, not {value[:40]!r}")
    if len(text.lstrip("0")) > 19 or int(text) > _MAX_SQL_INTEGER:
        raise InvalidQuery(f"{name} must be at most {_MAX_SQL_INTEGER}, not {value[:40]}")
    return int(text)


def _element(keyword: str, value: Any) -> dict[str, Any]:
    key = QUERY_KEYS.get(keyword)
    vr = key.vr if key else dictionary_VR(keyword)
    if value is None or value == []:
        return {"vr": vr}
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": v} for v in values]}
    if vr == "IS":
        return {"vr": vr, "Value": [int(v) for v in values]}
    return {"vr": vr, "Value": [str(v) for v in values]}


def _tag(keyword: str) -> str:
    key = QUERY_KEYS.get(keyword)
    return f"{key.tag if key else tag_for_keyword(keyword):08X}"


def dicom_json(row: dict[str, Any], level: QueryLevel, extra_keys: list[str]) -> dict[str, Any]:
    """One result as DICOM JSON, with its RetrieveURL (PS3.18 10.6.3.3)."""
    result = {_tag(keyword): _element(keyword, value) for keyword, value in row.items()}
    for keyword in extra_keys:
        result.setdefault(_tag(keyword), {"vr": dictionary_VR(keyword)})
    # storage.query.search: a row holds the unique keys of its level and the levels above.
    study = row["StudyInstanceUID"]
    if level == QueryLevel.STUDY:
        url = urls.study_url(study)
    elif level == QueryLevel.SERIES:
        url = urls.series_url(study, row["SeriesInstanceUID"])
    else:
        url = urls.instance_url(study, row["SeriesInstanceUID"], row["SOPInstanceUID"])
    result[_RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
    result[_INSTANCE_AVAILABILITY] = {"vr": "CS", "Value": ["ONLINE"]}
    return dict(sorted(result.items()))


def _json_array(items: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    yield b"["
    for i, item in enumerate(items):
        yield (b"," if i else b"") + json.dumps(item, separators=(",", ":")).encode()
    yield b"]"


class SearchTransaction:
    """PS3.18 10.6: the search resources, one method per target resource."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def archive(self) -> Archive:
        """The request's archive, scoped to its partition (``server.partitions``)."""
        return request_archive()

    def _search(self, level: QueryLevel, path_keys: dict[str, str]) -> Response:
        context = http_context()
        try:
            form = SearchForm(level, self.settings, path_keys)
        except StorageError as error:
            entry = refusal_entry(AuditEvent.QUERY, error, service="QIDO-RS", resource=request.path)
            self.archive.record_refusal(context, entry)
            raise
        # Recorded before any match is sent (PS3.15 A.5.3.10 Query): by the search, on its own
        # connection, as it begins.
        query = form.query
        entry = query_entry(level.value, query.matching, service="QIDO-RS", resource=request.path)
        rows = search(self.archive, query, (context, entry))
        # Runs the query now (after its record), so an invalid one is a 400, not a 200, and a
        # record that cannot be written a 503.
        first = next(rows, None)
        matches = chain([first], rows) if first is not None else iter(())
        body = _json_array(dicom_json(row, level, form.extra_keys) for row in matches)
        response = Response(stream_with_context(body), content_type=DICOM_JSON)
        for text in form.warnings:
            # PS3.18 8.4.5 / RFC 7234 5.5: warn-code 299 with the reason.
            # The text may quote a parameter name as sent: made header-safe.
            response.headers.add("Warning", f'299 hilum "{warning_text(text)}"')
        return response

    @requires(Action.QUERY)
    def search_for_studies(self) -> Response:
        return self._search(QueryLevel.STUDY, {})

    @requires(Action.QUERY)
    def search_for_series(self, study: str | None = None) -> Response:
        return self._search(QueryLevel.SERIES, {"StudyInstanceUID": study} if study else {})

    @requires(Action.QUERY)
    def search_for_instances(self, study: str | None = None, series: str | None = None) -> Response:
        keys = {"StudyInstanceUID": study} if study else {}
        if series:
            keys["SeriesInstanceUID"] = series
        return self._search(QueryLevel.IMAGE, keys)


def blueprint(settings: Settings) -> Blueprint:
    qido = SearchTransaction(settings)
    bp = Blueprint("qido", __name__)
    bp.add_url_rule("/studies", view_func=qido.search_for_studies, methods=["GET"])
    bp.add_url_rule("/series", view_func=qido.search_for_series, methods=["GET"])
    bp.add_url_rule("/instances", view_func=qido.search_for_instances, methods=["GET"])
    bp.add_url_rule("/studies/<study>/series", view_func=qido.search_for_series, methods=["GET"])
    bp.add_url_rule(
        "/studies/<study>/instances", view_func=qido.search_for_instances, methods=["GET"]
    )
    bp.add_url_rule(
        "/studies/<study>/series/<series>/instances",
        view_func=qido.search_for_instances,
        methods=["GET"],
    )
    return bp
