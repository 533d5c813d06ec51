"""The change feed and the webhooks' delivery state as JSON.

``GET /api/changes?since=SEQ&limit=N``   events after id ``since`` (default 0), oldest first, at
                                         most ``limit`` (100; 1..1000), of the request's
                                         partition; ``type`` (repeatable) filters. The answer:
                                         ``{"events": [...], "next": id}``, where ``next`` is
                                         the ``since`` of the next call (the last id returned,
                                         or ``since`` when none was)
``GET /api/webhooks``                    every subscriber (webhooks, ``fhir-push``): cursor,
                                         events delivered, back-off, last error, lease, dead
                                         letters by state (admin)
``GET /api/webhooks/{name}/dead-letters`` its dead letters (``state`` filters) (admin)
``POST /api/webhooks/{name}/dead-letters/{id}/replay``  deliver that event again, ahead of the
                                         cursor (202) (admin)

Ids are handed out in commit order (``storage/events.py``), so a poller that keeps ``next``
never misses an event, as long as it polls more often than ``[events] keep_days``.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from config import Settings
from server.access import Action, requires
from server.partitions import request_archive
from storage import outbox
from storage.archive import Archive
from storage.errors import InvalidQuery, NotFound
from storage.events import changes, event_types


def events_blueprint(settings: Settings, archive: Archive) -> Blueprint:
    blueprint = Blueprint("events", __name__)
    subscribers = {webhook.name for webhook in settings.events.webhooks}
    if settings.fhir.push_url:
        subscribers.add("fhir-push")
    subscribers |= {f"route-{rule.name}" for rule in settings.routing.rules}

    @blueprint.get("/changes")
    @requires(Action.QUERY)
    def list_changes() -> Any:
        args = request.args
        try:
            since = int(args.get("since", 0))
            limit = int(args.get("limit", 100))
        except ValueError:
            raise InvalidQuery("since and limit must be integers") from None
        types = args.getlist("type")
        unknown = [t for t in types if t not in event_types()]
        if unknown:
            raise InvalidQuery(
                f"unknown event type {unknown[0]!r}: one of {', '.join(event_types())}"
            )
        found = changes(request_archive(), since, limit, types=types)
        return jsonify(
            {
                "events": [event.as_json() for event in found],
                "next": found[-1].id if found else since,
            }
        )

    @blueprint.get("/webhooks")
    @requires(Action.ADMIN)
    def list_webhooks() -> Any:
        states = outbox.subscriber_states(archive)
        configured = {webhook.name: webhook for webhook in settings.events.webhooks}
        answer = []
        for name in sorted(subscribers | set(states)):
            webhook = configured.get(name)
            answer.append(
                {
                    "name": name,
                    "configured": name in subscribers,
                    "events": webhook.events if webhook else None,
                    **states.get(name, {"position": 0, "delivered": 0, "dead_letters": {}}),
                }
            )
        return jsonify(answer)

    def _known(name: str) -> None:
        if name not in subscribers and name not in outbox.subscriber_states(archive):
            raise NotFound(f"no webhook {name[:64]!r}")

    @blueprint.get("/webhooks/<name>/dead-letters")
    @requires(Action.ADMIN)
    def list_dead_letters(name: str) -> Any:
        _known(name)
        state = request.args.get("state") or None
        if state not in (None, "dead", "replay", "replayed"):
            raise InvalidQuery("state must be dead, replay or replayed")
        return jsonify(
            [letter.as_json() for letter in outbox.dead_letters(archive, name, state=state)]
        )

    @blueprint.post("/webhooks/<name>/dead-letters/<int:dead_letter_id>/replay")
    @requires(Action.ADMIN)
    def replay_dead_letter(name: str, dead_letter_id: int) -> Any:
        _known(name)
        if not 0 < dead_letter_id < 2**63:
            raise NotFound(f"no dead letter {dead_letter_id}")
        return jsonify(outbox.replay(archive, name, dead_letter_id).as_json()), 202

    return blueprint
