"""Webhooks: each event POSTed as JSON to a receiver, signed with HMAC-SHA256.

The signature header follows the Stripe style::

    Hilum-Signature: t=1767225600,v1=5257a869e7ec…(64 hex digits)

``t`` is the Unix time of the attempt; ``v1`` is the hex HMAC-SHA256, keyed with the webhook's
secret, of ``"{t}." + body`` (the body's bytes exactly as received). A receiver recomputes it,
compares in constant time, and refuses a ``t`` too far from its own clock (replay of a captured
request). ``Hilum-Event-Id`` and ``Hilum-Event-Type`` repeat the event's id and type: delivery
is at least once, so a receiver drops an id it has already taken. Any 2xx status takes the
event; anything else, or no answer within ``[events] timeout_s``, is a failed attempt.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import time

import urllib3

from config.settings import Webhook
from storage.events import ChangeEvent

SIGNATURE_HEADER = "Hilum-Signature"


class DeliveryError(Exception):
    """The receiver did not take the event; the message says why (no secret in it)."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Hilum-Signature`` header value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str, header: str, body: bytes, *, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """What a receiver does (the tests use it): the header's signature is ``body``'s under
    ``secret``, made within ``tolerance_s`` of ``now``."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def event_body(event: ChangeEvent) -> bytes:
    return json.dumps(event.as_json(), separators=(",", ":"), sort_keys=True).encode()


class WebhookSubscriber:
    """Delivers the events one ``[[events.webhooks]]`` entry asks for."""

    def __init__(self, webhook: Webhook, http: urllib3.PoolManager, timeout_s: float) -> None:
        self.name = webhook.name
        self._webhook = webhook
        self._http = http
        self._timeout = urllib3.Timeout(connect=min(timeout_s, 5.0), read=timeout_s)

    def wants(self, event: ChangeEvent) -> bool:
        webhook = self._webhook
        if webhook.partitions and event.partition not in webhook.partitions:
            return False
        return any(fnmatch.fnmatchcase(event.type, pattern) for pattern in webhook.events)

    def deliver(self, event: ChangeEvent) -> None:
        body = event_body(event)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Hilum-Webhooks/1",
            "Hilum-Event-Id": str(event.id),
            "Hilum-Event-Type": event.type,
            SIGNATURE_HEADER: sign(self._webhook.secret, int(time.time()), body),
        }
        try:
            response = self._http.request(
                "POST",
                self._webhook.url,
                body=body,
                headers=headers,
                timeout=self._timeout,
                retries=False,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as error:
            raise DeliveryError(f"no answer: {type(error).__name__}: {error}") from None
        if not 200 <= response.status < 300:
            raise DeliveryError(f"HTTP {response.status} {response.data[:200]!r}")
