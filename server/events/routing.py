"""Auto-routing (``[[routing.rules]]``): what a rule matches is forwarded by C-STORE to a
C-MOVE destination (``hilum peers``, seeded by ``[[dimse.peers]]``), as a subscriber of the
change feed (``route-<name>``), so with its order, lease, retries with back-off, dead letters
and replay; ``GET /api/webhooks`` shows each destination's queue (its cursor, back-off, last
error).

A rule of level ``instance`` reads ``instance.stored``: the stored instance is sent when it
matches. A rule of level ``study`` reads ``study.stable``: the study's matching instances are
sent on one association. Matching is C-FIND's (``storage.query``, PS3.4 C.2.2.2) on the index's
keys, plus the event's UIDs. The instance goes out as stored when the destination accepts its
transfer syntax, else decoded (``server/dimse/storage_scu.py``, C-MOVE's own sender). A refused
association, a lost connection or a failure status fails the delivery, which is retried; a
Warning status (0xB…) counts as stored (PS3.4 B.2.3).
"""

from __future__ import annotations

import contextlib
import logging

from config import Settings
from config.settings import ConfigError, RoutingRule
from server.dimse.negotiation import AssociationRefused, request_association
from server.dimse.pdu import AssociationEnded
from server.dimse.storage_scu import SubOperationFailed, proposed_contexts, store_instance
from server.dimse.tls import client_context
from server.events.webhooks import DeliveryError
from storage.archive import Archive
from storage.errors import StorageError
from storage.events import ChangeEvent, EventType
from storage.move_destinations import find_move_destination
from storage.query import QUERY_KEYS, Query, QueryLevel, locate_instances

log = logging.getLogger(__name__)


class RouteSubscriber:
    def __init__(self, rule: RoutingRule, settings: Settings, archive: Archive) -> None:
        unknown = sorted(set(rule.match) - set(QUERY_KEYS))
        if unknown:
            raise ConfigError(
                f"routing rule {rule.name}: {unknown[0]} is not a key Hilum matches on "
                "(docs/conformance.md lists the C-FIND keys)"
            )
        self.name = f"route-{rule.name}"
        self._rule = rule
        self._settings = settings
        self._archive = archive
        self._event = (
            EventType.INSTANCE_STORED if rule.level == "instance" else EventType.STUDY_STABLE
        )

    def wants(self, event: ChangeEvent) -> bool:
        if self._rule.partitions and event.partition not in self._rule.partitions:
            return False
        return event.type == self._event

    def deliver(self, event: ChangeEvent) -> None:
        matching = {**self._rule.match, "StudyInstanceUID": event.study_instance_uid}
        if self._rule.level == "instance":
            matching["SOPInstanceUID"] = str(event.payload.get("SOPInstanceUID", ""))
        archive = self._archive.scoped(event.partition)
        try:
            instances = list(locate_instances(archive, Query(QueryLevel.IMAGE, matching)))
        except StorageError as error:
            raise DeliveryError(f"index: {error}") from None
        if not instances:
            return  # it does not match (or was deleted since): nothing to send
        # The destination as stored now (`hilum peers`, seeded by [[dimse.peers]]).
        try:
            peer = find_move_destination(self._archive.index, self._rule.destination)
        except StorageError as error:
            raise DeliveryError(f"index: {error}") from None
        if peer is None:
            raise DeliveryError(
                f"{self._rule.destination} is not a known destination (hilum peers add)"
            )
        dimse = self._settings.dimse
        try:
            assoc = request_association(
                peer.host,
                peer.port,
                calling_ae_title=dimse.ae_title,
                called_ae_title=peer.ae_title,
                contexts=proposed_contexts(
                    {(i.sop_class_uid, i.transfer_syntax_uid) for i in instances}
                ),
                max_pdu_length=dimse.max_pdu_length,
                timeout=dimse.network_timeout_s,
                tls=client_context(dimse) if peer.tls else None,
            )
        except (AssociationRefused, AssociationEnded, OSError) as error:
            raise DeliveryError(f"{peer.ae_title}: {error}") from None
        try:
            for instance in instances:
                try:
                    status = store_instance(
                        assoc, archive, instance, self._settings.server.transcode_max_bytes
                    )
                except (SubOperationFailed, StorageError) as error:
                    raise DeliveryError(f"{instance.sop_instance_uid}: {error}") from None
                except (AssociationEnded, OSError) as error:
                    raise DeliveryError(f"{peer.ae_title}: {error}") from None
                if status != 0 and status >> 12 != 0xB:
                    raise DeliveryError(
                        f"{peer.ae_title} answered 0x{status:04X} to {instance.sop_instance_uid}"
                    )
            log.info(
                "%s: %d instance(s) of study %s sent to %s",
                self.name,
                len(instances),
                event.study_instance_uid,
                peer.ae_title,
            )
        finally:
            with contextlib.suppress(AssociationEnded, OSError):
                assoc.release(timeout=dimse.network_timeout_s)
