"""The JSON API beside DICOMweb (``/api``): what Hilum itself knows that DICOM has no word for,
such as the AI jobs of a study; scoped to the partition of its root like DICOMweb."""

from __future__ import annotations

from flask import Flask

from config import Settings
from server.api.jobs import jobs_blueprint


def register_api(app: Flask, settings: Settings) -> None:
    """At ``/api`` (the default partition) and ``/partitions/{name}/api``."""
    from server.dicomweb import no_sniffing
    from server.partitions import PARTITION_ROOT

    jobs = jobs_blueprint(settings)
    jobs.after_request(no_sniffing)
    app.register_blueprint(jobs, url_prefix="/api")
    app.register_blueprint(jobs, url_prefix=PARTITION_ROOT + "/api", name="partition_jobs")
