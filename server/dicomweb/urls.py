"""The URLs DICOMweb responses point at (RetrieveURL, Content-Location, BulkDataURI)."""

from __future__ import annotations

from flask import request

PREFIX = "/dicomweb"


def root() -> str:
    """The service root as the client reached it, e.g. ``http://host:8042/dicomweb``."""
    return request.url_root.rstrip("/") + PREFIX


def study_url(study: str) -> str:
    return f"{root()}/studies/{study}"


def series_url(study: str, series: str) -> str:
    return f"{study_url(study)}/series/{series}"


def instance_url(study: str, series: str, instance: str) -> str:
    return f"{series_url(study, series)}/instances/{instance}"
