"""Who is asking, from where, and in which partition: one request context for every transport.

An HTTP request (``hilum serve`` and ``hilum web``), a DIMSE association, a CLI command and the
AI worker each carry one :class:`RequestContext`, made in one place per transport and read by
the access check (``server.access``), the audit trail and the logs. The archive a request works
on is scoped to ``context.partition`` (``Archive.scoped``), so no query or retrieve can forget
the partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from storage.index.models import DEFAULT_PARTITION

PrincipalKind = Literal["anonymous", "user", "token", "oidc", "ae", "system"]
Transport = Literal["http", "dimse", "cli", "worker"]


@dataclass(frozen=True)
class Principal:
    """Who: a user (password login), an API token, an OpenID Connect subject, a calling AE
    title, Hilum itself, or nobody (authentication off)."""

    kind: PrincipalKind
    name: str  # user name, OIDC subject, calling AE title, "anonymous" or "hilum"
    roles: frozenset[str] = frozenset()
    # The partitions this principal may see; None: every partition.
    partitions: frozenset[str] | None = None
    token_id: str | None = None  # the API token used, if any (its id, never the secret)

    def may_see(self, partition: str) -> bool:
        return self.partitions is None or partition in self.partitions


# Authentication off (the loopback-only embedded default): whoever reaches the port may do
# everything, as before access control existed.
UNAUTHENTICATED = Principal("anonymous", "anonymous", frozenset({"admin"}))
# Authentication on, no credentials: no role, so only public routes (the access check answers
# 401 for any other before the partition is entered).
ANONYMOUS = Principal("anonymous", "anonymous")
# Hilum acting on its own behalf: the AI worker, the stability scan, migrations.
SYSTEM = Principal("system", "hilum", frozenset({"admin", "worker"}))


@dataclass(frozen=True)
class RequestContext:
    principal: Principal
    address: str  # the peer's IP address (after trusted proxies); "" for CLI and worker
    transport: Transport
    partition: str = DEFAULT_PARTITION
    request_id: str = ""  # HTTP X-Request-Id, or the association's name in the logs


def http_context() -> RequestContext:
    """The context of the HTTP request being served (set before every request by the app)."""
    from flask import g

    context: RequestContext = g.hilum_context
    return context


def cli_context(command: str) -> RequestContext:
    """A CLI command (``hilum import``): run by whoever holds a shell on the host and Hilum's
    configuration (its database credentials), recorded as that operating-system user."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for the uid (a container's arbitrary user)
        user = "unknown"
    return RequestContext(Principal("system", f"os:{user}"), "", "cli", request_id=command)


def worker_context(job_id: int, partition: str = DEFAULT_PARTITION) -> RequestContext:
    """The AI worker running one job (Hilum acting on its own behalf) in its study's partition."""
    return RequestContext(SYSTEM, "", "worker", partition, request_id=f"job-{job_id}")
