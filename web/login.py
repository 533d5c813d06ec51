"""Browser login (``/login``, ``/logout``): a password checked against the account's argon2
hash, then a signed session cookie (HttpOnly, SameSite=Lax, Secure over HTTPS; set up by the
app's access check in ``server/app.py``) that names the user and holds the session's CSRF token.

A failed login says the same thing whether or not the user exists, and costs the same time
(``Accounts.check_password``); failures are throttled per user name and per source address
(``[auth] login_max_failures_per_*``).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from config import Settings
from server.access import Action, allowed, requires
from server.authentication import LoginThrottle
from server.context import http_context
from server.partitions import partition_prefix
from storage.accounts import Accounts
from storage.archive import Archive
from storage.audit import AuditEntry, AuditEvent, login_entry
from storage.index.models import DEFAULT_PARTITION

if TYPE_CHECKING:
    from server.oidc import OidcVerifier

log = logging.getLogger(__name__)
FAILED = "Unknown user name or wrong password."


def csrf_token() -> str:
    """The session's CSRF token (made with the session): forms and scripts send it back."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def _next_page(value: str | None, partitions: Sequence[str] = ()) -> str:
    """Where to go after logging in: a path of this site only (never //host or a URL); by
    default the worklist, the first partition's for a user bound to partitions (the default
    partition's would be a 404 for them)."""
    if value and value.startswith("/") and not value.startswith(("//", "/\\")) and value != "/":
        return value
    if partitions and DEFAULT_PARTITION not in partitions:
        return partition_prefix(sorted(partitions)[0]) + "/"
    return "/"


def register(blueprint: Blueprint, settings: Settings, archive: Archive) -> None:
    auth = settings.auth
    accounts = Accounts(archive.index) if auth.enabled else None
    throttle = LoginThrottle(
        auth.login_max_failures_per_user, auth.login_max_failures_per_address, auth.login_window_s
    )

    @blueprint.app_context_processor
    def _identity() -> dict[str, Any]:
        """Who is logged in, for the page header, and the CSRF token for forms."""
        context = g.get("hilum_context")
        principal = context.principal if context is not None else None
        roles = principal.roles if principal is not None else frozenset()
        # What the navigation offers: only what this user may open.
        may = {action.value for action in Action if allowed(roles, action)}
        if not auth.enabled:
            return {"auth_enabled": False, "current_user": None, "csrf_token": "", "may": may}
        user = principal.name if principal is not None and principal.kind != "anonymous" else None
        return {"auth_enabled": True, "current_user": user, "csrf_token": csrf_token(), "may": may}

    def _form(status: int, error: str = "", name: str = "") -> Response:
        page = render_template(
            "login.html",
            error=error,
            name=name,
            next=_next_page(request.values.get("next")),
            oidc_login=auth.enabled and auth.oidc.browser_login,
        )
        return Response(page, status=status, mimetype="text/html")

    @blueprint.get("/login")
    @requires(Action.PUBLIC)
    def login_page() -> Any:
        if not auth.enabled:
            return redirect("/", 303)
        return _form(200)

    @blueprint.post("/login")
    @requires(Action.PUBLIC)
    def log_in() -> Any:
        if accounts is None:
            return redirect("/", 303)
        # The CSRF token of the form was checked by the access check (server/app.py).
        name = request.form.get("username", "").strip()
        password = request.form.get("password", "")
        address = request.remote_addr or ""
        wait = throttle.retry_after(name, address)
        if wait > 0:
            minutes = max(1, math.ceil(wait / 60))
            log.warning("login refused: too many failures (from %s)", address)
            archive.record(
                http_context(), login_entry(name, success=False, reason="too many failures")
            )
            response = _form(
                429,
                f"Too many failed logins. Try again in {minutes} minute{'s' * (minutes > 1)}.",
                name,
            )
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
        account = accounts.check_password(name, password) if name and password else None
        if account is None:
            throttle.failed(name, address)
            log.info("login failed (from %s)", address)
            archive.record(
                http_context(),
                login_entry(name, success=False, reason="unknown user or wrong password"),
            )
            return _form(401, FAILED, name)
        throttle.succeeded(name)
        # Recorded before the session exists: no login that the trail does not hold.
        archive.record(http_context(), login_entry(account.name, success=True, method="password"))
        session.clear()  # a new session: nothing of the one before the login carries over
        session.permanent = True
        session["user"] = account.name
        session["csrf"] = secrets.token_urlsafe(32)
        log.info("login: user %s from %s", account.name, address)
        return redirect(_next_page(request.form.get("next"), account.partitions), 303)

    def _oidc() -> OidcVerifier | None:
        authenticator = current_app.extensions.get("hilum.authenticator")
        if not auth.oidc.browser_login or authenticator is None:
            return None
        return authenticator.oidc  # type: ignore[no-any-return]

    @blueprint.get("/login/oidc")
    @requires(Action.PUBLIC)
    def oidc_login() -> Any:
        """To the provider's login (OpenID Connect Core 3.1.2), back at the callback."""
        oidc = _oidc()
        if oidc is None:
            return redirect("/login", 303)
        flow = {
            "state": secrets.token_urlsafe(24),
            "nonce": secrets.token_urlsafe(24),
            "verifier": secrets.token_urlsafe(48),
            "next": _next_page(request.args.get("next")),
        }
        session["oidc_flow"] = flow
        callback = url_for("login.oidc_callback", _external=True)
        try:
            target = oidc.authorization_url(
                callback, flow["state"], flow["nonce"], flow["verifier"]
            )
        except (OSError, ValueError, KeyError) as error:
            log.warning("OIDC login: the provider's discovery document failed: %s", error)
            return _form(503, "The sign-in service cannot be reached. Try again later.")
        return redirect(target, 303)

    @blueprint.get("/login/oidc/callback")
    @requires(Action.PUBLIC)
    def oidc_callback() -> Any:
        oidc = _oidc()
        flow = session.pop("oidc_flow", None)
        state, code = request.args.get("state", ""), request.args.get("code", "")
        if oidc is None or not isinstance(flow, dict) or not code:
            return _form(400, "The sign-in did not complete. Try again.")
        if not secrets.compare_digest(str(flow.get("state", "")), state):  # Core 3.1.2.7
            return _form(400, "The sign-in did not complete. Try again.")
        callback = url_for("login.oidc_callback", _external=True)
        verified = oidc.redeem(code, callback, str(flow["verifier"]), str(flow["nonce"]))
        if verified is None:
            archive.record(
                http_context(),
                login_entry(
                    "", success=False, reason="not confirmed by the provider", method="oidc"
                ),
            )
            return _form(401, "The sign-in service did not confirm who you are. Try again.")
        principal, expires_at = verified
        archive.record(http_context(), login_entry(principal.name, success=True, method="oidc"))
        session.clear()
        session.permanent = True
        session["user"] = principal.name
        session["oidc"] = {
            "roles": sorted(principal.roles),
            "partitions": sorted(principal.partitions)
            if principal.partitions is not None
            else None,
            "exp": expires_at,
        }
        session["csrf"] = secrets.token_urlsafe(32)
        log.info("login: %s through OpenID Connect from %s", principal.name, request.remote_addr)
        return redirect(str(flow.get("next") or "/"), 303)

    @blueprint.post("/logout")
    @requires(Action.PUBLIC)
    def log_out() -> Any:
        if "user" in session:
            archive.record(
                http_context(),
                AuditEntry(AuditEvent.LOGOUT, detail={"user": str(session["user"])}),
            )
        session.clear()
        return redirect("/login", 303)
