"""OpenID Connect bearer JWTs (``[auth.oidc]``), validated with PyJWT.

A JWT is accepted when its signature verifies with a key of the provider's JSON Web Key Set
(RFC 7517; ``jwks_url``, or the ``jwks_uri`` of the issuer's discovery document, OpenID Connect
Discovery 1.0 section 4), its ``iss`` is the configured issuer, its ``aud`` contains the
configured audience, and ``exp`` / ``nbf`` / ``iat`` hold (RFC 7519 4.1). Its roles and
partitions come from the configured claims.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from typing import Any

import jwt

from config.settings import OidcSettings
from server.access import ROLE_ACTIONS
from server.context import Principal

log = logging.getLogger(__name__)
DISCOVERY_TIMEOUT_S = 10.0


class OidcVerifier:
    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self._jwks: jwt.PyJWKClient | None = None
        self._lock = threading.Lock()

    def _keys(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._jwks is None:
                url = self.settings.jwks_url or self._discover_jwks_url()
                # Keys cached (5 min) and fetched again for a key id the set lacks (rotation).
                self._jwks = jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=10)
            return self._jwks

    def _discover_jwks_url(self) -> str:
        issuer = self.settings.issuer.rstrip("/")
        url = f"{issuer}/.well-known/openid-configuration"
        with urllib.request.urlopen(url, timeout=DISCOVERY_TIMEOUT_S) as response:  # noqa: S310
            document = json.load(response)
        if document.get("issuer") != self.settings.issuer:
            raise jwt.PyJWKClientError(
                f"the discovery document at {url} names issuer {document.get('issuer')!r}"
            )
        return str(document["jwks_uri"])

    def verify(self, token: str) -> tuple[Principal, float] | None:
        """The principal of a valid token and when it expires (epoch seconds); None, with the
        reason at INFO (never the token), when it is not valid."""
        settings = self.settings
        try:
            key = self._keys().get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=settings.algorithms,
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except (jwt.PyJWKClientConnectionError, OSError, ValueError, KeyError) as error:
            log.warning("OIDC key set unavailable or unusable: %s", error)
            return None
        except (jwt.InvalidTokenError, jwt.PyJWKClientError) as error:
            log.info("OIDC token refused: %s", error)
            return None
        roles = frozenset(
            r for r in _strings(_claim(claims, settings.roles_claim)) if r in ROLE_ACTIONS
        )
        partitions = None
        if settings.partitions_claim:
            value = _claim(claims, settings.partitions_claim)
            if value is not None:
                partitions = frozenset(_strings(value))
        name = claims.get(settings.username_claim) or claims["sub"]
        principal = Principal("oidc", str(name)[:128], roles, partitions)
        return principal, float(claims["exp"])


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for step in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(step)
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()  # a space-separated string, like OAuth 2.0 "scope"
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []
