"""The browser UI: Hilum's own pages, served by the one Flask app (``create_app``).

``register_web(app, settings)`` registers the pages (at ``/`` for the default partition and at
``/partitions/{name}/`` for another, ``server.partitions``) and, at the root only, the static
files and the OHIF viewer. The pages are rendered on the server (Jinja) and use storage's
services (the worklist, the jobs queue, the query, ingest); the browser's scripts are small and
plain, and the upload page talks STOW-RS to its partition's ``/dicomweb`` like any other client.

Every route names the action it needs (``@requires``); the app's one access check
(``server/app.py``) authenticates, enters the request's partition (404 for one the principal may
not see) and sends a browser that is not logged in to ``/login`` (``web/login.py``).
"""

from __future__ import annotations

from flask import Flask

from config import Settings
from web.pages import audit_blueprint, login_blueprint, pages_blueprint, web_blueprint


def register_web(app: Flask, settings: Settings) -> None:
    from server.partitions import PARTITION_ROOT

    app.register_blueprint(web_blueprint(settings))
    app.register_blueprint(login_blueprint(settings, app.extensions["hilum.archive"]))
    app.register_blueprint(audit_blueprint(app.extensions["hilum.archive"]))
    pages = pages_blueprint(settings)
    app.register_blueprint(pages)
    app.register_blueprint(pages, url_prefix=PARTITION_ROOT, name="partition_pages")


__all__ = ["register_web"]
