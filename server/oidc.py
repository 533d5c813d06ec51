"""OpenID Connect bearer JWTs (``[auth.oidc]``), validated with PyJWT.

A JWT is accepted when its signature verifies with a key of the provider's JSON Web Key Set
(RFC 7517; ``jwks_url``, or the ``jwks_uri`` of the issuer's discovery document, OpenID Connect
Discovery 1.0 section 4), its ``iss`` is the configured issuer, its ``aud`` contains the
configured audience, and ``exp`` / ``nbf`` / ``iat`` hold (RFC 7519 4.1). Its roles and
partitions come from the configured claims.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import urllib.parse
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
        self._discovery: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _keys(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._jwks is None:
                url = self.settings.jwks_url or str(self._discovered()["jwks_uri"])
                # Keys cached (5 min) and fetched again for a key id the set lacks (rotation).
                self._jwks = jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=10)
            return self._jwks

    def _discovered(self) -> dict[str, Any]:
        """The issuer's discovery document (OpenID Connect Discovery 1.0 section 4), once."""
        if self._discovery is None:
            issuer = self.settings.issuer.rstrip("/")
            url = f"{issuer}/.well-known/openid-configuration"
            with urllib.request.urlopen(url, timeout=DISCOVERY_TIMEOUT_S) as response:  # noqa: S310
                document = json.load(response)
            if document.get("issuer") != self.settings.issuer:  # section 4.3
                raise jwt.PyJWKClientError(
                    f"the discovery document at {url} names issuer {document.get('issuer')!r}"
                )
            self._discovery = document
        return self._discovery

    def authorization_url(self, redirect_uri: str, state: str, nonce: str, verifier: str) -> str:
        """Where to send the browser to log in (Core 3.1.2.1), with PKCE (RFC 7636, S256)."""
        with self._lock:
            endpoint = str(self._discovered()["authorization_endpoint"])
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        query = urllib.parse.urlencode(
            {
                "response_type": "code",
                "client_id": self.settings.browser_client_id,
                "redirect_uri": redirect_uri,
                "scope": "openid profile",
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge.rstrip(b"=").decode(),
                "code_challenge_method": "S256",
            }
        )
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"

    def redeem(
        self, code: str, redirect_uri: str, verifier: str, nonce: str
    ) -> tuple[Principal, float] | None:
        """The principal of the ID token the provider gives for ``code`` (Core 3.1.3), its
        nonce checked; None, with the reason logged, when there is none or it is not valid."""
        settings = self.settings
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "client_id": settings.browser_client_id,
            "code_verifier": verifier,
        }
        if settings.client_secret.get_secret_value():
            form["client_secret"] = settings.client_secret.get_secret_value()
        try:
            with self._lock:
                endpoint = str(self._discovered()["token_endpoint"])
            request = urllib.request.Request(
                endpoint,
                data=urllib.parse.urlencode(form).encode(),
                headers={"Accept": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=DISCOVERY_TIMEOUT_S) as response:  # noqa: S310
                id_token = str(json.load(response)["id_token"])
        except (OSError, ValueError, KeyError, jwt.PyJWKClientError) as error:
            log.warning("OIDC login: the provider's token endpoint failed: %s", error)
            return None
        return self.verify(id_token, audience=settings.browser_client_id, nonce=nonce)

    def verify(
        self, token: str, *, audience: str | None = None, nonce: str | None = None
    ) -> tuple[Principal, float] | None:
        """The principal of a valid token and when it expires (epoch seconds); None, with the
        reason at INFO (never the token), when it is not valid. ``nonce``: an ID token of a
        browser login must carry this one (Core 3.1.3.7)."""
        settings = self.settings
        try:
            key = self._keys().get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=settings.algorithms,
                audience=audience or settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
            if nonce is not None and not hmac.compare_digest(str(claims.get("nonce", "")), nonce):
                raise jwt.InvalidTokenError("the ID token's nonce is not this login's")
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
