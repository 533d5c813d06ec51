"""The browser UI: Hilum's own pages, served by the one Flask app (``create_app``).

``register_web(app, settings, archive)`` registers one blueprint holding every page and its
static files. The pages are rendered on the server (Jinja) and use storage's services (the
worklist, the jobs queue, the query, ingest); the browser's scripts are small and plain, and the
upload page talks STOW-RS to ``/dicomweb`` like any other client.

Every route names the action it needs (``@requires``); the app's one access check
(``server/app.py``) sends a browser that is not logged in to ``/login`` (``web/login.py``).
"""

from __future__ import annotations

from flask import Flask

from config import Settings
from storage.archive import Archive
from web.pages import web_blueprint


def register_web(app: Flask, settings: Settings, archive: Archive) -> None:
    app.register_blueprint(web_blueprint(settings, archive))


__all__ = ["register_web"]
