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
from typing import Any

from flask import Blueprint, Response, g, redirect, render_template, request, session

from config import Settings
from server.access import Action, allowed, requires
from server.authentication import LoginThrottle
from storage.accounts import Accounts
from storage.archive import Archive

log = logging.getLogger(__name__)
FAILED = "Unknown user name or wrong password."


def csrf_token() -> str:
    """The session's CSRF token (made with the session): forms and scripts send it back."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def _next_page(value: str | None) -> str:
    """Where to go after logging in: a path of this site only (never //host or a URL)."""
    if value and value.startswith("/") and not value.startswith(("//", "/\\")):
        return value
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
            "login.html", error=error, name=name, next=_next_page(request.values.get("next"))
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
            return _form(401, FAILED, name)
        throttle.succeeded(name)
        session.clear()  # a new session: nothing of the one before the login carries over
        session.permanent = True
        session["user"] = account.name
        session["csrf"] = secrets.token_urlsafe(32)
        log.info("login: user %s from %s", account.name, address)
        return redirect(_next_page(request.form.get("next")), 303)

    @blueprint.post("/logout")
    @requires(Action.PUBLIC)
    def log_out() -> Any:
        session.clear()
        return redirect("/login", 303)
