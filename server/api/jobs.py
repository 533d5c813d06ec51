"""AI jobs as JSON: the jobs of a study, one job, and a re-run.

``GET /api/studies/{StudyInstanceUID}/jobs``  every job of the study, oldest first (``[]`` if none)
``GET /api/jobs/{id}``                        one job; 404 if there is no such job (any id)
``POST /api/jobs/{id}/rerun``                 queue a done or failed job again (202); 409 while it
                                              runs; a queued job is left as it is

A study that is not a valid UID is a 400. Storage errors (``NotFound``, ``Conflict``,
``StorageUnavailable``) become HTTP statuses in the app's one error table
(``server.dicomweb.statuses``).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from config import Settings
from inference.jobs import JobQueue
from storage.archive import Archive
from storage.dicom_file import is_valid_uid
from storage.errors import InvalidQuery


def jobs_blueprint(settings: Settings, archive: Archive) -> Blueprint:
    blueprint = Blueprint("jobs", __name__)
    queue = JobQueue(archive, settings.inference)

    @blueprint.get("/studies/<study_instance_uid>/jobs")
    def list_study_jobs(study_instance_uid: str) -> Any:
        if not is_valid_uid(study_instance_uid):
            raise InvalidQuery(f"{study_instance_uid[:80]!r} is not a Study Instance UID")
        return jsonify([job.as_json() for job in queue.for_study(study_instance_uid)])

    @blueprint.get("/jobs/<int:job_id>")
    def retrieve_job(job_id: int) -> Any:
        return jsonify(queue.get(job_id).as_json())

    @blueprint.post("/jobs/<int:job_id>/rerun")
    def rerun_job(job_id: int) -> Any:
        return jsonify(queue.rerun(job_id).as_json()), 202

    return blueprint
