"""AI jobs as JSON: the jobs of a study, one job, and a re-run.

``GET /api/jobs``                             jobs newest first; ``state``, ``model``, ``study``
                                              (StudyInstanceUID) filter, ``limit`` (100, at
                                              most 1000) and ``before`` (a job id) page
``GET /api/studies/{StudyInstanceUID}/jobs``  every job of the study, oldest first (``[]`` if none)
``GET /api/studies/{StudyInstanceUID}/reviews``  the reviewers' decisions on its AI findings
``GET /api/jobs/{id}``                        one job; 404 if there is no such job (any id)
``POST /api/jobs/{id}/rerun``                 queue a done or failed job again (202); 409 while it
                                              runs; a queued job is left as it is

A study that is not a valid UID is a 400. Storage errors (``NotFound``, ``Conflict``,
``StorageUnavailable``) become HTTP statuses in the app's one error table
(``server.dicomweb.statuses``).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from config import Settings
from storage.archive import Archive
from storage.dicom_file import is_valid_uid
from storage.errors import InvalidQuery
from storage.jobs import JobQueue
from storage.reviews import reviews_for_study


def jobs_blueprint(settings: Settings, archive: Archive) -> Blueprint:
    blueprint = Blueprint("jobs", __name__)
    queue = JobQueue(archive, settings.inference)

    @blueprint.get("/studies/<study_instance_uid>/jobs")
    def list_study_jobs(study_instance_uid: str) -> Any:
        if not is_valid_uid(study_instance_uid):
            raise InvalidQuery(f"{study_instance_uid[:80]!r} is not a Study Instance UID")
        return jsonify([job.as_json() for job in queue.for_study(study_instance_uid)])

    @blueprint.get("/jobs")
    def search_jobs() -> Any:
        args = request.args
        try:
            limit = int(args.get("limit", 100))
            before = int(args["before"]) if args.get("before") else None
        except ValueError:
            raise InvalidQuery("limit and before must be integers") from None
        jobs = queue.search(
            state=args.get("state") or None,
            model=args.get("model") or None,
            study_instance_uid=args.get("study") or None,
            before_id=before,
            limit=limit,
        )
        return jsonify([job.as_json() for job in jobs])

    @blueprint.get("/studies/<study_instance_uid>/reviews")
    def list_study_reviews(study_instance_uid: str) -> Any:
        return jsonify([r.as_json() for r in reviews_for_study(archive, study_instance_uid)])

    @blueprint.get("/jobs/<int:job_id>")
    def retrieve_job(job_id: int) -> Any:
        return jsonify(queue.get(job_id).as_json())

    @blueprint.post("/jobs/<int:job_id>/rerun")
    def rerun_job(job_id: int) -> Any:
        return jsonify(queue.rerun(job_id).as_json()), 202

    return blueprint
