"""AI jobs as JSON: the jobs of a study, one job, and a re-run.

``GET /api/jobs``                             jobs newest first; ``state``, ``model``, ``study``
                                              (StudyInstanceUID) filter, ``limit`` (100, at
                                              most 1000) and ``before`` (a job id) page;
                                              ``order=queue``: STAT first, then oldest first
``GET /api/studies/{StudyInstanceUID}/jobs``  every job of the study, oldest first (``[]`` if none)
``GET /api/studies/{StudyInstanceUID}/reviews``  the reviewers' decisions on its AI findings
``GET /api/studies/{StudyInstanceUID}/findings`` the findings of its done AI jobs (index rows)
``GET /api/reviews``                          every decision, oldest first: ``decision``
                                              (accepted/rejected), ``model``, ``since`` (ISO
                                              8601), ``after`` (an id) and ``limit`` (1000)
``POST /api/studies/{StudyInstanceUID}/jobs``  ``{"model": name}``: run a model on the study by
                                              hand (202, the jobs); 404 no such study, 400 no
                                              such model, 409 no series it can read
``GET /api/jobs/{id}``                        one job; 404 if there is no such job (any id)
``POST /api/jobs/{id}/rerun``                 queue a done or failed job again (202); 409 while it
                                              runs; a queued job is left as it is

A study that is not a valid UID is a 400. Storage errors (``NotFound``, ``Conflict``,
``StorageUnavailable``) become HTTP statuses in the app's one error table
(``server.dicomweb.statuses``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, jsonify, request

from config import Settings
from inference.catalog import ModelCatalog
from inference.errors import ModelError
from inference.stability import queue_model_by_hand
from server.access import Action, requires
from server.partitions import request_archive
from storage.dicom_file import is_valid_uid
from storage.errors import InvalidQuery
from storage.jobs import JobQueue
from storage.reviews import Decision, reviews_for_study, search_reviews


def _queue(settings: Settings) -> JobQueue:
    """The jobs of the request's partition."""
    return JobQueue(request_archive(), settings.inference)


def jobs_blueprint(settings: Settings) -> Blueprint:
    blueprint = Blueprint("jobs", __name__)
    catalog = ModelCatalog(settings.inference.models_dirs)

    @blueprint.get("/studies/<study_instance_uid>/jobs")
    @requires(Action.JOBS)
    def list_study_jobs(study_instance_uid: str) -> Any:
        if not is_valid_uid(study_instance_uid):
            raise InvalidQuery(f"{study_instance_uid[:80]!r} is not a Study Instance UID")
        return jsonify([job.as_json() for job in _queue(settings).for_study(study_instance_uid)])

    @blueprint.get("/jobs")
    @requires(Action.JOBS)
    def search_jobs() -> Any:
        args = request.args
        try:
            limit = int(args.get("limit", 100))
            before = int(args["before"]) if args.get("before") else None
        except ValueError:
            raise InvalidQuery("limit and before must be integers") from None
        jobs = _queue(settings).search(
            state=args.get("state") or None,
            model=args.get("model") or None,
            study_instance_uid=args.get("study") or None,
            before_id=before,
            limit=limit,
            queue_order=args.get("order") == "queue",
        )
        return jsonify([job.as_json() for job in jobs])

    @blueprint.post("/studies/<study_instance_uid>/jobs")
    @requires(Action.JOBS)
    def run_model_on_study(study_instance_uid: str) -> Any:
        body = request.get_json(silent=True) or {}
        try:
            model = catalog.get(str(body.get("model", "")))
        except ModelError as error:
            raise InvalidQuery(str(error)) from None
        jobs = queue_model_by_hand(request_archive(), settings, model, study_instance_uid)
        return jsonify([job.as_json() for job in jobs]), 202

    @blueprint.get("/studies/<study_instance_uid>/findings")
    @requires(Action.QUERY)
    def list_study_findings(study_instance_uid: str) -> Any:
        return jsonify(
            [
                {**finding.as_json(), "job": job.id, "model": job.as_json()["model"]}
                for job, finding in _queue(settings).findings_of_study(study_instance_uid)
            ]
        )

    @blueprint.get("/reviews")
    @requires(Action.QUERY)
    def search_all_reviews() -> Any:
        args = request.args
        try:
            decision = Decision(args["decision"]) if args.get("decision") else None
            since = datetime.fromisoformat(args["since"]) if args.get("since") else None
            after = int(args["after"]) if args.get("after") else None
            limit = int(args.get("limit", 1000))
        except ValueError as error:
            raise InvalidQuery(f"decision, since, after or limit: {error}") from None
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        found = search_reviews(
            request_archive(),
            decision=decision,
            model=args.get("model") or None,
            since=since,
            after_id=after,
            limit=limit,
        )
        return jsonify([{"id": row_id, **review.as_json()} for row_id, review in found])

    @blueprint.get("/studies/<study_instance_uid>/reviews")
    @requires(Action.QUERY)
    def list_study_reviews(study_instance_uid: str) -> Any:
        return jsonify(
            [r.as_json() for r in reviews_for_study(request_archive(), study_instance_uid)]
        )

    @blueprint.get("/jobs/<int:job_id>")
    @requires(Action.JOBS)
    def retrieve_job(job_id: int) -> Any:
        return jsonify(_queue(settings).get(job_id).as_json())

    @blueprint.post("/jobs/<int:job_id>/rerun")
    @requires(Action.JOBS)
    def rerun_job(job_id: int) -> Any:
        return jsonify(_queue(settings).rerun(job_id).as_json()), 202

    return blueprint
