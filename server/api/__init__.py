"""The JSON API beside DICOMweb (``/api``): what Hilum itself knows that DICOM has no word for,
such as the AI jobs of a study."""

from __future__ import annotations

from flask import Flask

from config import Settings
from server.api.events import events_blueprint
from server.api.jobs import jobs_blueprint
from storage.archive import Archive


def register_api(app: Flask, settings: Settings, archive: Archive) -> None:
    from server.dicomweb import no_sniffing

    jobs = jobs_blueprint(settings, archive)
    jobs.after_request(no_sniffing)
    app.register_blueprint(jobs, url_prefix="/api")
    events = events_blueprint(settings, archive)  # /api/changes, /api/webhooks
    events.after_request(no_sniffing)
    app.register_blueprint(events, url_prefix="/api")
