"""The browser UI: Hilum's own pages, served by the one Flask app (``create_app``).

``register_web(app, settings, archive)`` registers one blueprint holding every page and its
static files. The pages are rendered on the server (Jinja) and use storage's services (the
worklist, the jobs queue, the query, ingest); the browser's scripts are small and plain, and the
upload page talks STOW-RS to ``/dicomweb`` like any other client.

Every route of the UI passes through the blueprint's one ``before_request`` hook
(:func:`web.pages.before_page`): the place where the access check of a later issue goes.
"""

from __future__ import annotations

from flask import Flask

from config import Settings
from storage.archive import Archive
from web.pages import web_blueprint


def register_web(app: Flask, settings: Settings, archive: Archive) -> None:
    app.register_blueprint(web_blueprint(settings, archive))


__all__ = ["register_web"]
