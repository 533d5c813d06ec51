"""The delivery loop: reads the change feed after each subscriber's cursor and delivers, in
order, at least once (``storage/outbox.py`` holds the cursor, lease, back-off and dead-letter
SQL).

It runs as a thread of ``hilum serve`` (``[events] serve_delivery``) and as ``hilum events``, a
process of its own, as many as wanted on any hosts: each subscriber is served by whichever loop
holds its lease, so adding loops adds availability, and a killed loop's subscribers are taken
over when its leases expire (``[events] lease_s``). The loop also prunes events older than
``[events] keep_days``, once an hour.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

import urllib3

from config import Settings
from server.events.webhooks import DeliveryError, WebhookSubscriber
from storage import outbox
from storage.archive import Archive
from storage.errors import StorageError
from storage.events import ChangeEvent, changes, event_by_id, prune_events, utc_now
from storage.settings_seed import seed_from_settings

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
_PRUNE_EVERY = timedelta(hours=1)


class Subscriber(Protocol):
    name: str

    def wants(self, event: ChangeEvent) -> bool: ...

    def deliver(self, event: ChangeEvent) -> None:
        """Deliver or raise :class:`DeliveryError`."""


def subscribers_from_settings(settings: Settings, archive: Archive) -> list[Subscriber]:
    """The configured webhooks, the FHIR push when ``[fhir] push_url`` is set, and one
    subscriber per routing rule (``[[routing.rules]]``)."""
    http = urllib3.PoolManager(maxsize=4, retries=False)
    found: list[Subscriber] = [
        WebhookSubscriber(webhook, http, settings.events.timeout_s)
        for webhook in settings.events.webhooks
    ]
    if settings.fhir.push_url:
        from server.fhir.push import FhirPushSubscriber

        found.append(FhirPushSubscriber(settings, archive, http))
    if settings.routing.rules:
        from server.events.routing import RouteSubscriber

        found += [RouteSubscriber(rule, settings, archive) for rule in settings.routing.rules]
    return found


class DeliveryLoop:
    """Delivers the feed to ``subscribers``; :meth:`run` until stopped, or :meth:`step`."""

    def __init__(
        self,
        settings: Settings,
        archive: Archive,
        subscribers: Sequence[Subscriber],
        *,
        clock: Clock = utc_now,
        batch: int = 100,
    ) -> None:
        # [[dimse.peers]] (the routes' destinations) and the rest seed the index on first start.
        seed_from_settings(archive.index, settings)
        self.settings = settings.events
        self.archive = archive
        self.subscribers = list(subscribers)
        self.clock = clock
        self.batch = batch
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._last_prune: datetime | None = None
        self._ready = False

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set; an idle pass waits ``poll_interval_s``. A storage
        error is logged and the loop goes on after the interval."""
        try:
            while not stop.is_set():
                try:
                    busy = self.step(stop)
                except StorageError as error:
                    log.warning("event delivery paused: %s", error)
                    busy = 0
                except Exception:
                    log.exception("event delivery failed; going on")
                    busy = 0
                if not busy:
                    stop.wait(self.settings.poll_interval_s)
        finally:
            for subscriber in self.subscribers:
                with contextlib.suppress(StorageError):  # else its lease expires on its own
                    outbox.release(self.archive, subscriber.name, self.owner)

    def step(self, stop: threading.Event | None = None) -> int:
        """One pass over every subscriber: the events delivered."""
        if not self._ready:
            outbox.ensure_subscribers(self.archive, [s.name for s in self.subscribers])
            self._ready = True
        self._prune()
        return sum(self._serve(subscriber, stop) for subscriber in self.subscribers)

    def _prune(self) -> None:
        now = self.clock()
        if self._last_prune is not None and now - self._last_prune < _PRUNE_EVERY:
            return
        self._last_prune = now
        pruned = prune_events(self.archive, self.settings.keep_days, now)
        if pruned:
            log.info("pruned %d events older than %g days", pruned, self.settings.keep_days)

    def _serve(self, subscriber: Subscriber, stop: threading.Event | None) -> int:
        settings = self.settings
        cursor = outbox.claim(
            self.archive, subscriber.name, self.owner, settings.lease_s, self.clock()
        )
        if cursor is None:
            return 0  # another loop serves it, or its back-off has not passed
        delivered = self._replay(subscriber)
        events = changes(self.archive, cursor.position, self.batch, all_partitions=True)
        position, taken = cursor.position, 0
        for event in events:
            if stop is not None and stop.is_set():
                break
            if subscriber.wants(event):
                try:
                    subscriber.deliver(event)
                except DeliveryError as error:
                    self._save(subscriber, cursor, position, taken)
                    self._failed(subscriber, event, str(error))
                    return delivered + taken
                taken += 1
            position = event.id
        self._save(subscriber, cursor, position, taken)
        return delivered + taken

    def _save(
        self, subscriber: Subscriber, cursor: outbox.Cursor, position: int, taken: int
    ) -> None:
        if position == cursor.position:
            return
        if not outbox.advance(
            self.archive,
            subscriber.name,
            self.owner,
            position,
            taken,
            self.settings.lease_s,
            self.clock(),
        ):
            log.warning("%s: lease lost to another delivery loop", subscriber.name)

    def _failed(self, subscriber: Subscriber, event: ChangeEvent, error: str) -> None:
        settings = self.settings
        dead = outbox.record_failure(
            self.archive,
            subscriber.name,
            self.owner,
            event.id,
            error,
            self.clock(),
            max_attempts=settings.max_attempts,
            backoff_s=settings.retry_backoff_s,
            max_backoff_s=settings.max_backoff_s,
        )
        if dead:
            log.warning(
                "%s: event %d (%s) dead-lettered after %d attempts: %s",
                subscriber.name,
                event.id,
                event.type,
                settings.max_attempts,
                error,
            )
        else:
            log.info(
                "%s: event %d not delivered, retried later: %s", subscriber.name, event.id, error
            )

    def _replay(self, subscriber: Subscriber) -> int:
        """Deliver the dead letters an administrator asked to replay; how many were taken."""
        taken = 0
        for letter in outbox.pending_replays(self.archive, subscriber.name):
            event = event_by_id(self.archive, letter.event_id)
            if event is None:
                error: str | None = "the event was pruned ([events] keep_days)"
            else:
                try:
                    subscriber.deliver(event)
                    error = None
                    taken += 1
                except DeliveryError as refused:
                    error = str(refused)
            outbox.finish_replay(self.archive, letter.id, error, self.clock())
        return taken
