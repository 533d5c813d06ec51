"""Health and metrics routes of every HTTP process (``hilum serve``, ``hilum web``).

``/healthz``: liveness, the process answers (no I/O, so a slow database never gets a live
process restarted). ``/readyz``: readiness, the index database and the blob store answer; 503
naming the one that does not (its reason in the log), so a load balancer stops sending
requests this process cannot serve. ``/metrics``: Prometheus text format (server/metrics.py).
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Flask, Response, g, jsonify, request

from server.access import Action, requires
from server.metrics import Metrics
from storage.archive import Archive
from storage.monitoring import check_readiness

log = logging.getLogger(__name__)


def register_monitoring(app: Flask, archive: Archive, metrics: Metrics) -> None:
    bp = Blueprint("monitoring", __name__)

    @bp.get("/healthz")
    @requires(Action.PUBLIC)
    def liveness() -> Response:
        return jsonify({"status": "alive"})

    @bp.get("/readyz")
    @requires(Action.PUBLIC)
    def readiness() -> Response:
        problems = check_readiness(archive)
        for name, problem in problems.items():
            if problem:
                # The reason goes to the log, not to whoever can reach the port: it names
                # internal hosts, buckets and paths.
                log.warning("not ready: %s: %s", name, problem)
        response = jsonify(
            {
                "status": "not ready" if any(problems.values()) else "ready",
                **{name: "unavailable" if problem else "ok" for name, problem in problems.items()},
            }
        )
        response.status_code = 503 if any(problems.values()) else 200
        return response

    @bp.get("/metrics")
    @requires(Action.PUBLIC)
    def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition(archive, request.headers.get("Accept", ""))
        return Response(body, content_type=content_type)

    app.register_blueprint(bp)

    @app.before_request
    def _start_clock() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        started = g.get("metrics_started")
        if started is not None:
            elapsed = time.perf_counter() - started
            metrics.observe_request(request.blueprint, response.status_code, elapsed)
        return response
