"""The JSON API beside DICOMweb (``/api``): what Hilum itself knows that DICOM has no word for,
such as the AI jobs of a study, scoped to the partition of its root like DICOMweb, and the
administration of partitions, AE permissions and C-MOVE destinations (``/api/admin``, of the
whole installation)."""

from __future__ import annotations

from flask import Flask

from config import Settings
from server.api.admin import ADMIN_ROOT, admin_blueprint
from server.api.audit import audit_blueprint
from server.api.events import events_blueprint
from server.api.jobs import jobs_blueprint
from server.api.research import research_blueprint
from server.audited_reads import record_reads


def register_api(app: Flask, settings: Settings) -> None:
    """At ``/api`` (the default partition) and ``/partitions/{name}/api``; ``/api/admin`` once."""
    from server.dicomweb import no_sniffing
    from server.partitions import PARTITION_ROOT

    archive = app.extensions["hilum.archive"]
    # /api/changes is the partition's; /api/webhooks (admin) the installation's.
    for blueprint in (
        jobs_blueprint(settings),
        research_blueprint(),
        events_blueprint(settings, archive),
    ):
        record_reads(blueprint, "JSON API")
        blueprint.after_request(no_sniffing)
        app.register_blueprint(blueprint, url_prefix="/api")
        app.register_blueprint(
            blueprint, url_prefix=PARTITION_ROOT + "/api", name=f"partition_{blueprint.name}"
        )
    admin = admin_blueprint(settings, archive)
    admin.after_request(no_sniffing)
    app.register_blueprint(admin, url_prefix=ADMIN_ROOT)
    # The audit trail is the whole archive's (every partition's), for administrators: /api only.
    audit = audit_blueprint(archive)
    audit.after_request(no_sniffing)
    app.register_blueprint(audit, url_prefix="/api")
