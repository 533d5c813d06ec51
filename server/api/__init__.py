"""The JSON API beside DICOMweb (``/api``): what Hilum itself knows that DICOM has no word for,
such as the AI jobs of a study, and the administration of partitions, AE permissions and
C-MOVE destinations (``/api/admin``)."""

from __future__ import annotations

from flask import Flask

from config import Settings
from server.api.admin import admin_blueprint
from server.api.jobs import jobs_blueprint
from server.api.research import research_blueprint
from storage.archive import Archive


def register_api(app: Flask, settings: Settings, archive: Archive) -> None:
    from server.dicomweb import no_sniffing

    jobs = jobs_blueprint(settings, archive)
    jobs.after_request(no_sniffing)
    app.register_blueprint(jobs, url_prefix="/api")
    admin = admin_blueprint(settings, archive)
    admin.after_request(no_sniffing)
    app.register_blueprint(admin, url_prefix="/api/admin")
    research = research_blueprint(archive)
    research.after_request(no_sniffing)
    app.register_blueprint(research, url_prefix="/api")
