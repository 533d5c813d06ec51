"""Who is asking, over HTTP: API tokens, OpenID Connect JWTs and browser logins.

:class:`Authenticator` turns the credentials of a request into a :class:`Principal` (roles and
partitions), or None. Verified credentials are remembered for ``[auth] token_cache_ttl_s`` (a
dictionary look-up instead of a database query: a request costs microseconds), so that a
revoked token, a disabled account or a changed role takes effect within that time. The access
check itself (which action a route needs, 401 / 403) is in ``server/app.py``; the table of what
each role may do in ``server/access.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from server.access import ROLE_ACTIONS
from server.context import Principal
from storage.accounts import AccountInfo, Accounts, token_digest

if TYPE_CHECKING:
    from config.settings import AuthSettings
    from server.oidc import OidcVerifier

log = logging.getLogger(__name__)

# Entries a process remembers at most; past that the cache starts again (a flood of distinct
# valid tokens is not a workload; it only bounds memory).
CACHE_MAX_ENTRIES = 10_000


def account_principal(
    account: AccountInfo, kind: str = "user", token_id: str | None = None
) -> Principal:
    roles = frozenset({account.role} & set(ROLE_ACTIONS))
    partitions = frozenset(account.partitions) if account.partitions else None
    return Principal(kind, account.name, roles, partitions, token_id)  # type: ignore[arg-type]


class _TimedCache:
    """key -> (principal, deadline on ``clock``); thread-safe enough for dict operations."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: dict[str, tuple[Principal | None, float]] = {}

    def get(self, key: str) -> tuple[bool, Principal | None]:
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if entry[1] <= self._clock():
            self._entries.pop(key, None)
            return False, None
        return True, entry[0]

    def put(self, key: str, principal: Principal | None, deadline: float) -> None:
        if len(self._entries) >= CACHE_MAX_ENTRIES:
            self._entries.clear()
        if deadline > self._clock():
            self._entries[key] = (principal, deadline)


class Authenticator:
    """Credentials -> :class:`Principal`, with verified results cached for ``ttl_s``."""

    def __init__(
        self,
        settings: AuthSettings,
        accounts: Accounts,
        oidc: OidcVerifier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.accounts = accounts
        self.oidc = oidc
        self._clock = clock
        self._ttl = settings.token_cache_ttl_s
        self._tokens = _TimedCache(clock)
        self._sessions = _TimedCache(clock)

    def bearer(self, token: str) -> Principal | None:
        """The principal of an API token or (with ``[auth.oidc]``) an OIDC JWT; None when it
        is unknown, revoked, expired, forged, or its account disabled."""
        key = token_digest(token)
        known, principal = self._tokens.get(key)
        if known:
            return principal
        now = self._clock()
        deadline = now + self._ttl
        expires_at: float | None
        if self.oidc is not None and token.count(".") == 2:
            verified = self.oidc.verify(token)
            if verified is None:
                return None  # not cached: a forged token costs its own verification
            principal, expires_at = verified
        else:
            owner = self.accounts.token_owner(token)
            if owner is None:
                return None
            principal = account_principal(owner.account, "token", owner.token_id)
            expires_at = owner.expires_at.timestamp() if owner.expires_at else None
        if expires_at is not None:
            deadline = min(deadline, expires_at)
        self._tokens.put(key, principal, deadline)
        return principal

    def session_principal(self, session: Mapping[str, Any]) -> Principal | None:
        """The principal of a browser session (its signed cookie already checked): a Hilum
        user's, looked up (cached) so that disabling takes effect; or an OpenID Connect login's,
        as the provider's ID token said, until that token's expiry."""
        name = session.get("user")
        if not isinstance(name, str):
            return None
        oidc = session.get("oidc")
        if oidc is None:
            return self.session_user(name)
        if not isinstance(oidc, dict) or float(oidc.get("exp", 0)) <= self._clock():
            return None
        partitions = oidc.get("partitions")
        return Principal(
            "oidc",
            name,
            frozenset(oidc.get("roles", ())) & set(ROLE_ACTIONS),
            frozenset(partitions) if partitions is not None else None,
        )

    def session_user(self, name: str) -> Principal | None:
        """The principal of a browser session of account ``name`` (signed cookie already
        checked); None when the account is gone or disabled."""
        known, principal = self._sessions.get(name)
        if known:
            return principal
        account = self.accounts.account(name)
        principal = None
        if account is not None and not account.disabled:
            principal = account_principal(account)
        self._sessions.put(name, principal, self._clock() + self._ttl)
        return principal


class LoginThrottle:
    """Failed logins per user name and per source address within a window; past the limit,
    further attempts are refused until the oldest failure leaves the window. Kept in memory by
    each process."""

    def __init__(
        self,
        per_user: int,
        per_address: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = {"user": per_user, "address": per_address}
        self._window = window_s
        self._clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _keys(self, user: str, address: str) -> list[tuple[str, str]]:
        return [("user", user.strip().lower()), ("address", address)]

    def retry_after(self, user: str, address: str) -> float:
        """Seconds until a login for ``user`` from ``address`` may be tried; 0: now."""
        now = self._clock()
        wait = 0.0
        with self._lock:
            for key in self._keys(user, address):
                failures = self._failures.get(key)
                if not failures:
                    continue
                while failures and failures[0] <= now - self._window:
                    failures.popleft()
                if len(failures) >= self._limits[key[0]]:
                    wait = max(wait, failures[0] + self._window - now)
        return wait

    def failed(self, user: str, address: str) -> None:
        now = self._clock()
        with self._lock:
            if len(self._failures) > 100_000:  # bound memory: drop the keys with nothing recent
                self._failures = {
                    k: v for k, v in self._failures.items() if v and v[-1] > now - self._window
                }
            for key in self._keys(user, address):
                self._failures.setdefault(key, deque(maxlen=self._limits[key[0]])).append(now)

    def succeeded(self, user: str) -> None:
        with self._lock:
            self._failures.pop(("user", user.strip().lower()), None)
