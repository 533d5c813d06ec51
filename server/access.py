"""What each role may do, and what each route needs: one table, default deny.

Every HTTP route (DICOMweb, JSON API, UI) names the one :class:`Action` it needs with
``@requires(Action.X)``; the access check reads it from the endpoint before the view runs, and
a route that names none is refused. DIMSE operations map to ``STORE``, ``QUERY`` and
``RETRIEVE``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any, TypeVar


class Action(StrEnum):
    STORE = "store"  # C-STORE, STOW-RS, upload
    QUERY = "query"  # C-FIND, QIDO-RS, the worklist
    RETRIEVE = "retrieve"  # C-MOVE, C-GET, WADO-RS/URI, thumbnails, the viewer
    REVIEW = "review"  # accept / reject AI findings
    DELETE = "delete"  # DELETE studies and series
    JOBS = "jobs"  # see and re-run AI jobs
    WORKER = "worker"  # the AI worker's own calls
    ADMIN = "admin"  # users, tokens, partitions, AE permissions, peers, audit
    PUBLIC = "public"  # no credentials needed: health, login page, static files


ROLE_ACTIONS: dict[str, frozenset[Action]] = {
    "admin": frozenset(Action),
    "radiologist": frozenset({Action.QUERY, Action.RETRIEVE, Action.REVIEW, Action.JOBS}),
    "technologist": frozenset({Action.STORE, Action.QUERY, Action.RETRIEVE}),
    "modality": frozenset({Action.STORE}),
    "researcher": frozenset({Action.QUERY, Action.RETRIEVE}),  # research partitions only
    "worker": frozenset({Action.WORKER, Action.STORE, Action.QUERY, Action.RETRIEVE}),
}
ROLES = tuple(ROLE_ACTIONS)

_View = TypeVar("_View", bound=Callable[..., Any])


def requires(action: Action) -> Callable[[_View], _View]:
    """Marks a view function with the action it needs (read by the access check)."""

    def mark(view: _View) -> _View:
        view.hilum_action = action  # type: ignore[attr-defined]
        return view

    return mark


def required_action(view: Callable[..., Any]) -> Action | None:
    return getattr(view, "hilum_action", None)


def allowed(roles: frozenset[str], action: Action) -> bool:
    return action is Action.PUBLIC or any(action in ROLE_ACTIONS.get(r, ()) for r in roles)
