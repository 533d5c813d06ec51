"""What monitoring reads from the stores: readiness (does the index database answer, does the
blob store answer: ``/readyz``) and the AI job counts by state (``hilum_jobs``)."""

from __future__ import annotations

from sqlalchemy import func, select, text

from storage.archive import Archive
from storage.errors import StorageUnavailable
from storage.index.models import InferenceJob

JOB_STATES = ("queued", "running", "done", "failed")


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


def count_jobs_by_state(archive: Archive) -> dict[str, int]:
    """How many jobs of the archive's partition are in each state (every state, 0 included):
    ``queued`` is the queue depth. One grouped count over the job table."""
    with archive.index.read() as session:
        rows = session.execute(
            select(InferenceJob.state, func.count())
            .where(InferenceJob.partition == archive.partition)
            .group_by(InferenceJob.state)
        ).all()
    counts = dict.fromkeys(JOB_STATES, 0)
    counts.update({str(state): int(count) for state, count in rows})
    return counts
