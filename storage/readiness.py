"""Readiness: does the index database answer, does the blob store answer (``/readyz``)."""

from __future__ import annotations

from sqlalchemy import text

from storage.archive import Archive
from storage.errors import StorageUnavailable


def check_readiness(archive: Archive) -> dict[str, str | None]:
    """``{"index": problem, "blobs": problem}``, each None when that store answered. Both are
    asked even when the first fails, so that an operator learns everything that is down."""
    problems: dict[str, str | None] = {}
    try:
        with archive.index.read() as session:
            session.execute(text("SELECT 1"))
        problems["index"] = None
    except StorageUnavailable as error:
        problems["index"] = str(error)
    try:
        archive.blobs.check()
        problems["blobs"] = None
    except StorageUnavailable as error:
        problems["blobs"] = str(error)
    return problems
