"""The URLs DICOMweb responses point at (RetrieveURL, Content-Location, BulkDataURI)."""

from __future__ import annotations

from typing import Any

from flask import request

from server.partitions import request_root
from storage.dicom_file import is_valid_uid
from storage.errors import InvalidQuery

PREFIX = "/dicomweb"
# The URL variables that hold UIDs (PS3.18 10.4.1: {study}, {series}, {instance}).
_PATH_UIDS = {"study": "Study", "series": "Series", "instance": "SOP Instance"}


def check_uid(uid: str, what: str) -> str:
    """A UID from a URL is a UID, never a matching value: ``*`` or a ``\\``-separated list in
    a path would otherwise search (PS3.4 C.2.2.2) where the client named one entity."""
    if not is_valid_uid(uid):
        raise InvalidQuery(
            f"{what} UID {uid[:80]!r} is not a valid UID (PS3.5 9.1: digits and dots, "
            "at most 64 characters)"
        )
    return uid


def check_path_uids(_endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Flask URL value preprocessor of every DICOMweb route: 400 for a malformed path UID."""
    for name, what in _PATH_UIDS.items():
        if values and name in values:
            check_uid(values[name], what)


def root() -> str:
    """The service root as the client reached it, e.g. ``http://host:8042/dicomweb``, or
    ``http://host:8042/partitions/{name}/dicomweb`` in another partition."""
    return request.url_root.rstrip("/") + request_root() + PREFIX


def study_url(study: str) -> str:
    return f"{root()}/studies/{study}"


def series_url(study: str, series: str) -> str:
    return f"{study_url(study)}/series/{series}"


def instance_url(study: str, series: str, instance: str) -> str:
    return f"{series_url(study, series)}/instances/{instance}"
