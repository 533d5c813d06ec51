"""DICOMweb (PS3.18): one blueprint per transaction family, rooted at ``/dicomweb``, and
WADO-URI at ``/wado``."""

from __future__ import annotations

from flask import Blueprint, Flask, Response

from config import Settings
from storage.archive import Archive


def register_dicomweb(app: Flask, settings: Settings, archive: Archive) -> None:
    from server.dicomweb import delete, qido, rendering, stow, wado, wado_uri
    from server.dicomweb.urls import PREFIX, check_path_uids

    dicomweb = Blueprint("dicomweb", __name__, url_prefix=PREFIX)
    # One UID check for every {study}, {series} and {instance} in a path (400 with the reason).
    dicomweb.url_value_preprocessor(check_path_uids)
    dicomweb.after_request(no_sniffing)
    for module in (qido, wado, rendering, stow, delete):
        dicomweb.register_blueprint(module.blueprint(archive, settings))
    app.register_blueprint(dicomweb)
    legacy = wado_uri.blueprint(archive, settings)
    legacy.after_request(no_sniffing)
    app.register_blueprint(legacy)


def no_sniffing(response: Response) -> Response:
    """A browser must take DICOM JSON, DICOM files and frames as the declared media type,
    never guess one (a Part 10 file's preamble is arbitrary bytes a sender chose)."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
