"""The administration API (``/api/admin``): partitions, DIMSE AE permissions, C-MOVE
destinations and CORS origins, as ``hilum partitions`` / ``ae`` / ``peers`` / ``cors`` manage
them. Every route needs ``Action.ADMIN``; a change applies to the DIMSE associations that start
after it, and to CORS within ``server.cors.ORIGINS_TTL_S`` seconds."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

from flask import Blueprint, Response, jsonify, request

from config import Settings
from server.access import Action, requires
from server.context import http_context
from storage.ae_permissions import (
    AEPermissionEntry,
    list_ae_permissions,
    remove_ae_permission,
    set_ae_permission,
)
from storage.archive import Archive
from storage.audit import AuditEntry, AuditEvent, Outcome, security_change_entry
from storage.cors_origins import add_cors_origin, list_cors_origins, remove_cors_origin
from storage.errors import InvalidArgument
from storage.index.models import DEFAULT_PARTITION
from storage.move_destinations import (
    MoveDestinationEntry,
    list_move_destinations,
    remove_move_destination,
    set_move_destination,
)
from storage.partitions import (
    add_partition_ae_title,
    ae_title,
    create_partition,
    list_partitions,
    remove_partition_ae_title,
)
from storage.settings_seed import seed_from_settings


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be true or false")
    return value


def _strings(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{name} must be a list of strings")
    return value


ADMIN_ROOT = "/api/admin"  # where server.api registers this blueprint


def _change_entry(outcome: Outcome = Outcome.SUCCESS, reason: str = "") -> AuditEntry:
    """The audit record of the change this request asks for (PS3.15 A.5.3.11 Security Alert:
    a partition's, or the DIMSE access's or CORS configuration's): what and how, from the
    request line and its JSON body (which holds no secret)."""
    path = request.path.removeprefix(ADMIN_ROOT)
    event = (
        AuditEvent.PARTITION_CHANGE if path.startswith("/partitions") else AuditEvent.CONFIG_CHANGE
    )
    body = request.get_json(silent=True)
    change = f"{request.method} {request.full_path.rstrip('?')}"
    if isinstance(body, dict):
        change += " " + json.dumps(body, sort_keys=True)[:500]
    entry = security_change_entry(event, path, change)
    return replace(entry, outcome=outcome, reason=reason)


def admin_blueprint(settings: Settings, archive: Archive) -> Blueprint:
    blueprint = Blueprint("admin", __name__)
    index = archive.index

    @blueprint.before_request
    def _seed() -> None:
        # The settings file's [[dimse.ae_permissions]] / [[dimse.peers]], on first start (not
        # before a partition they name is created: creating it must work).
        if "/partitions" not in request.path:
            seed_from_settings(index, settings)

    @blueprint.before_request
    def _audit_change() -> None:
        # Every change is recorded before it is made (no change the audit trail does not
        # hold: a failure to record answers 503 and changes nothing); one that then fails is
        # recorded again with its failure (after_request below).
        if request.method in ("POST", "PUT", "DELETE"):
            archive.record(http_context(), _change_entry())

    @blueprint.after_request
    def _audit_failed_change(response: Response) -> Response:
        if request.method in ("POST", "PUT", "DELETE") and response.status_code >= 400:
            archive.record_refusal(
                http_context(),
                _change_entry(Outcome.MINOR_FAILURE, f"answered {response.status_code}"),
            )
        return response

    @blueprint.get("/partitions")
    @requires(Action.ADMIN)
    def list_all_partitions() -> Any:
        return jsonify([
            {"name": p.name, "ae_titles": [settings.dimse.ae_title] * (p.name == DEFAULT_PARTITION)
             + list(p.ae_titles)}
            for p in list_partitions(index)
        ])  # fmt: skip

    @blueprint.post("/partitions")
    @requires(Action.ADMIN)
    def create_a_partition() -> Any:
        body = _body()
        entry = create_partition(
            index,
            str(body.get("name", "")),
            _strings(body, "ae_titles"),
            reserved_ae_title=settings.dimse.ae_title,
        )
        return jsonify({"name": entry.name, "ae_titles": list(entry.ae_titles)}), 201

    @blueprint.put("/partitions/<name>/ae-titles/<title>")
    @requires(Action.ADMIN)
    def add_a_partition_ae_title(name: str, title: str) -> Any:
        add_partition_ae_title(index, name, title, reserved_ae_title=settings.dimse.ae_title)
        return "", 204

    @blueprint.delete("/partitions/<name>/ae-titles/<title>")
    @requires(Action.ADMIN)
    def remove_a_partition_ae_title(name: str, title: str) -> Any:
        remove_partition_ae_title(index, name, ae_title(title))
        return "", 204

    @blueprint.get("/ae-permissions")
    @requires(Action.ADMIN)
    def list_all_ae_permissions() -> Any:
        return jsonify([asdict(entry) for entry in list_ae_permissions(index)])

    @blueprint.put("/ae-permissions/<title>/<partition>")
    @requires(Action.ADMIN)
    def set_an_ae_permission(title: str, partition: str) -> Any:
        body = _body()
        entry = AEPermissionEntry(
            ae_title(title),
            partition,
            _flag(body, "store"),
            _flag(body, "query"),
            _flag(body, "retrieve"),
            tuple(_strings(body, "networks")),
        )
        added = set_ae_permission(index, entry)
        stored = next(
            e for e in list_ae_permissions(index)
            if (e.calling_ae_title, e.partition) == (entry.calling_ae_title, partition)
        )  # fmt: skip
        return jsonify(asdict(stored)), 201 if added else 200

    @blueprint.delete("/ae-permissions/<title>")
    @requires(Action.ADMIN)
    def remove_ae_permissions(title: str) -> Any:
        remove_ae_permission(index, ae_title(title), request.args.get("partition") or None)
        return "", 204

    @blueprint.get("/cors-origins")
    @requires(Action.ADMIN)
    def list_all_cors_origins() -> Any:
        return jsonify(list_cors_origins(index))

    @blueprint.post("/cors-origins")
    @requires(Action.ADMIN)
    def add_a_cors_origin() -> Any:
        origin = _body().get("origin")
        if not isinstance(origin, str):
            raise InvalidArgument('give {"origin": "scheme://host[:port]"}')
        added = add_cors_origin(index, origin)
        return jsonify({"origin": origin.strip()}), 201 if added else 200

    @blueprint.delete("/cors-origins")
    @requires(Action.ADMIN)
    def remove_a_cors_origin() -> Any:
        remove_cors_origin(index, request.args.get("origin", ""))
        return "", 204

    @blueprint.get("/peers")
    @requires(Action.ADMIN)
    def list_all_peers() -> Any:
        return jsonify([asdict(entry) for entry in list_move_destinations(index)])

    @blueprint.put("/peers/<title>")
    @requires(Action.ADMIN)
    def set_a_peer(title: str) -> Any:
        body = _body()
        port = body.get("port")
        if not isinstance(port, int) or isinstance(port, bool):
            raise InvalidArgument("port must be an integer")
        entry = MoveDestinationEntry(
            ae_title(title), str(body.get("host", "")), port, _flag(body, "tls")
        )
        added = set_move_destination(index, entry)
        return jsonify(asdict(entry)), 201 if added else 200

    @blueprint.delete("/peers/<title>")
    @requires(Action.ADMIN)
    def remove_a_peer(title: str) -> Any:
        remove_move_destination(index, ae_title(title))
        return "", 204

    return blueprint
