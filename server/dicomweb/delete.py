"""DELETE of a study, a series or an instance (PS3.18 10.4 has no delete transaction; this is
the de-facto form dcm4chee and Orthanc serve, which dicomweb-client's ``delete_*`` call)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, g, request
from werkzeug.exceptions import Forbidden

from config import Settings
from server.access import Action, requires
from server.context import http_context
from server.partitions import request_archive
from storage.archive import Archive
from storage.audit import AuditEvent, refusal_entry
from storage.delete import Deletion, delete_instance, delete_series, delete_study
from storage.errors import StorageError

log = logging.getLogger(__name__)


class DeleteTransaction:
    @property
    def archive(self) -> Archive:
        """The request's archive, scoped to its partition (``server.partitions``)."""
        return request_archive()

    def _done(self, deletion: Deletion, what: str) -> Response:
        log.info(
            "request %s from %s deleted %s (%d instance(s), %d orphan blob(s))",
            g.get("request_id", "-"),
            request.remote_addr,
            what,
            deletion.instances,
            len(deletion.orphan_blobs),
        )
        return Response(status=204)

    def _refused(self, study: str, error: StorageError) -> None:
        entry = refusal_entry(
            AuditEvent.DELETE, error, service="DICOMweb", study_uids=[study], resource=request.path
        )
        self.archive.record_refusal(http_context(), entry)

    @requires(Action.DELETE)
    def delete_study(self, study: str) -> Response:
        try:
            deletion = delete_study(self.archive, study, requestor=http_context())
        except StorageError as error:
            self._refused(study, error)
            raise
        return self._done(deletion, f"study {study}")

    @requires(Action.DELETE)
    def delete_series(self, study: str, series: str) -> Response:
        try:
            deletion = delete_series(self.archive, study, series, requestor=http_context())
        except StorageError as error:
            self._refused(study, error)
            raise
        return self._done(deletion, f"series {series}")

    @requires(Action.DELETE)
    def delete_instance(self, study: str, series: str, instance: str) -> Response:
        try:
            deletion = delete_instance(
                self.archive, study, series, instance, requestor=http_context()
            )
        except StorageError as error:
            self._refused(study, error)
            raise
        return self._done(deletion, f"instance {instance}")


def blueprint(settings: Settings) -> Blueprint:
    transaction = DeleteTransaction()
    bp = Blueprint("delete", __name__)

    @bp.before_request
    def _allowed() -> None:
        # Deleting is off unless the operator opts in (and then needs the delete permission).
        if not settings.http.allow_delete:
            raise Forbidden(
                "DELETE is disabled on this server; set [http] allow_delete = true "
                "(HILUM_HTTP__ALLOW_DELETE=true) to enable it"
            )

    bp.add_url_rule("/studies/<study>", view_func=transaction.delete_study, methods=["DELETE"])
    bp.add_url_rule(
        "/studies/<study>/series/<series>",
        view_func=transaction.delete_series,
        methods=["DELETE"],
    )
    bp.add_url_rule(
        "/studies/<study>/series/<series>/instances/<instance>",
        view_func=transaction.delete_instance,
        methods=["DELETE"],
    )
    return bp
