"""DICOMweb (PS3.18): one blueprint per transaction family, rooted at ``/dicomweb``, and
WADO-URI at ``/wado``; both again under ``/partitions/{name}`` for another partition
(``server.partitions``)."""

from __future__ import annotations

from flask import Blueprint, Flask, Response

from config import Settings


def register_dicomweb(app: Flask, settings: Settings) -> None:
    from server.dicomweb import delete, qido, rendering, stow, wado, wado_uri
    from server.dicomweb.urls import PREFIX, check_path_uids
    from server.partitions import PARTITION_ROOT

    dicomweb = Blueprint("dicomweb", __name__)
    # One UID check for every {study}, {series} and {instance} in a path (400 with the reason).
    dicomweb.url_value_preprocessor(check_path_uids)
    dicomweb.after_request(no_sniffing)
    for module in (qido, wado, rendering, stow, delete):
        dicomweb.register_blueprint(module.blueprint(settings))
    legacy = wado_uri.blueprint(settings)
    legacy.after_request(no_sniffing)
    # The default partition's root, then another partition's (the same views).
    app.register_blueprint(dicomweb, url_prefix=PREFIX)
    app.register_blueprint(dicomweb, url_prefix=PARTITION_ROOT + PREFIX, name="partition_dicomweb")
    app.register_blueprint(legacy)
    app.register_blueprint(legacy, url_prefix=PARTITION_ROOT, name="partition_wado_uri")


def no_sniffing(response: Response) -> Response:
    """A browser must take DICOM JSON, DICOM files and frames as the declared media type,
    never guess one (a Part 10 file's preamble is arbitrary bytes a sender chose)."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
