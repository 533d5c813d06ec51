"""DICOMweb (PS3.18): one blueprint per transaction family, rooted at ``/dicomweb``, and
WADO-URI at ``/wado``."""

from __future__ import annotations

from flask import Blueprint, Flask

from config import Settings
from storage.archive import Archive


def register_dicomweb(app: Flask, settings: Settings, archive: Archive) -> None:
    from server.dicomweb import delete, qido, rendering, stow, wado, wado_uri
    from server.dicomweb.urls import PREFIX, check_path_uids

    dicomweb = Blueprint("dicomweb", __name__, url_prefix=PREFIX)
    # One UID check for every {study}, {series} and {instance} in a path (400 with the reason).
    dicomweb.url_value_preprocessor(check_path_uids)
    for module in (qido, wado, rendering, stow, delete):
        dicomweb.register_blueprint(module.blueprint(archive, settings))
    app.register_blueprint(dicomweb)
    app.register_blueprint(wado_uri.blueprint(archive, settings))
