"""AI jobs as JSON: the jobs of a study, one job, and a re-run.

``GET /api/studies/{StudyInstanceUID}/jobs``  every job of the study, oldest first (``[]`` if none)
``GET /api/jobs/{id}``                        one job; 404 if there is no such job
``POST /api/jobs/{id}/rerun``                 queue a done or failed job again (202); 409 while it
                                              runs; a queued job is left as it is

Storage errors (``NotFound``, ``Conflict``, ``StorageUnavailable``) become HTTP statuses in the
app's one error table (``server.dicomweb.statuses``).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from config import Settings
from inference.jobs import JobQueue
from storage.archive import Archive


def jobs_blueprint(settings: Settings, archive: Archive) -> Blueprint:
    blueprint = Blueprint("jobs", __name__)
    queue = JobQueue(archive, settings.inference)

    @blueprint.get("/studies/<study_instance_uid>/jobs")
    def list_study_jobs(study_instance_uid: str) -> Any:
        return jsonify([job.as_json() for job in queue.for_study(study_instance_uid)])

    @blueprint.get("/jobs/<int:job_id>")
    def retrieve_job(job_id: int) -> Any:
        return jsonify(queue.get(job_id).as_json())

    @blueprint.post("/jobs/<int:job_id>/rerun")
    def rerun_job(job_id: int) -> Any:
        return jsonify(queue.rerun(job_id).as_json()), 202

    return blueprint
