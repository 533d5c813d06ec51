"""The origins whose browser pages may call Hilum's HTTP API (CORS, server/cors.py), stored in
the index so that administrators change them without a restart (``hilum cors``, the admin
API). ``[http] cors_allowed_origins`` is copied here on first start (storage/settings_seed.py).
"""

from __future__ import annotations

from sqlalchemy import delete, select

from config.settings import check_origin
from storage.errors import InvalidArgument, NotFound
from storage.index.database import Index, affected_rows
from storage.index.models import CorsOrigin


def cors_origin(value: str) -> str:
    """``value`` if CORS may list it (scheme://host[:port] or "*"); raise InvalidArgument."""
    try:
        return check_origin(value.strip())
    except ValueError as error:
        raise InvalidArgument(str(error)) from None


def add_cors_origin(index: Index, origin: str) -> bool:
    """List ``origin``; True if it was not listed yet."""
    origin = cors_origin(origin)
    with index.write() as session:
        if session.get(CorsOrigin, origin) is not None:
            return False
        session.add(CorsOrigin(origin=origin))
    return True


def remove_cors_origin(index: Index, origin: str) -> None:
    with index.write() as session:
        removed = affected_rows(session, delete(CorsOrigin).where(CorsOrigin.origin == origin))
    if not removed:
        raise NotFound(f"no CORS origin {origin[:100]!r} is listed")


def list_cors_origins(index: Index) -> list[str]:
    with index.read() as session:
        return list(session.scalars(select(CorsOrigin.origin).order_by(CorsOrigin.origin)))
