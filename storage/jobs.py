"""Read-only SQL over the AI job table for monitoring (the queue's own SQL is in
inference/jobs.py)."""

from __future__ import annotations

from sqlalchemy import func, select

from storage.archive import Archive
from storage.index.models import InferenceJob

JOB_STATES = ("queued", "running", "done", "failed")


def count_jobs_by_state(archive: Archive) -> dict[str, int]:
    """How many jobs of the archive's partition are in each state (every state, 0 included):
    ``queued`` is the queue depth. One grouped count on the indexed state column."""
    with archive.index.read() as session:
        rows = session.execute(
            select(InferenceJob.state, func.count())
            .where(InferenceJob.partition == archive.partition)
            .group_by(InferenceJob.state)
        ).all()
    counts = dict.fromkeys(JOB_STATES, 0)
    counts.update({str(state): int(count) for state, count in rows})
    return counts
