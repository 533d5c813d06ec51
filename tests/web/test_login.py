"""Logging in to the UI in Chromium against a real Hilum with ``[auth] enabled``: the redirect to
the login page and back, the one failure message, the header with the user and the log-out, the
CSRF token on the UI's state-changing requests (upload, a form posted from another site's page),
and login throttling per user name and per source address."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from pydicom.uid import generate_uid

from config import Settings
from server.app import HttpServer, create_app
from storage.accounts import Accounts
from storage.archive import Archive, open_archive
from tests.conftest import free_port, make_settings
from tests.factories import ct_instance, ensure_partition, write_part10
from tests.web.conftest import screenshot

PASSWORD = "radiology rocks 42"
FAILED = "Unknown user name or wrong password."
AUTH = {
    "enabled": True,
    "login_max_failures_per_user": 3,
    "login_max_failures_per_address": 6,
}


@dataclass
class Site:
    settings: Settings
    url: str


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Archive]]:
    settings = make_settings(tmp_path_factory.mktemp("login"), auth=AUTH)
    archive = open_archive(settings, migrate=True)
    accounts = Accounts(archive.index)
    accounts.add_account("rad", "radiologist", password=PASSWORD)
    accounts.add_account("tech", "technologist", password=PASSWORD)
    accounts.add_account("boss", "admin", password=PASSWORD)
    ensure_partition(archive.index, "hospital_a")
    accounts.add_account("dr-a", "radiologist", ["hospital_a"], password=PASSWORD)
    try:
        yield settings, archive
    finally:
        archive.close()


@pytest.fixture
def site(archive: tuple[Settings, Archive]) -> Iterator[Site]:
    """A Hilum of its own for each test: its login throttle starts empty."""
    settings, shared = archive
    http = HttpServer(create_app(settings, shared), "127.0.0.1", free_port())
    http.start()
    try:
        yield Site(settings, f"http://127.0.0.1:{http.port}")
    finally:
        http.stop()


def _log_in(page: Page, user: str, password: str) -> None:
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_login_logout_and_the_uniform_failure_message(site: Site, page: Page) -> None:
    page.goto(site.url + "/jobs?state=failed")
    expect(page).to_have_url(site.url + "/login?next=/jobs%3Fstate%3Dfailed")
    expect(page.get_by_role("heading", name="Log in to Hilum")).to_be_visible()
    expect(page.get_by_role("navigation", name="Main")).to_have_count(0)
    screenshot(page, "login")

    _log_in(page, "rad", "not the password")
    expect(page.get_by_role("alert")).to_have_text(FAILED)
    _log_in(page, "nobody-here", "not the password")
    expect(page.get_by_role("alert")).to_have_text(FAILED)  # the same whether the user exists
    assert "rad" not in page.get_by_role("alert").inner_text()
    assert page.get_by_label("Password").input_value() == ""  # never sent back
    screenshot(page, "login-failed")

    _log_in(page, "rad", PASSWORD)
    expect(page).to_have_url(site.url + "/jobs?state=failed")  # back where it started
    expect(page.locator("#current-user")).to_have_text("rad")
    cookie = next(c for c in page.context.cookies() if c["name"] == "hilum_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and not cookie["secure"]  # http
    screenshot(page, "logged-in")

    # A radiologist may not upload: the page says so.
    response = page.goto(site.url + "/upload")
    assert response is not None and response.status == 403

    page.goto(site.url + "/")
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(site.url + "/login")
    page.goto(site.url + "/")
    expect(page).to_have_url(site.url + "/login?next=/")


def test_a_user_bound_to_a_partition_lands_on_its_worklist(site: Site, page: Page) -> None:
    page.goto(site.url + "/")
    _log_in(page, "dr-a", PASSWORD)
    expect(page).to_have_url(site.url + "/partitions/hospital_a/")
    expect(page.locator("header.top .partition")).to_have_text("hospital_a")
    # The default partition's worklist does not exist for this user.
    response = page.goto(site.url + "/")
    assert response is not None and response.status == 404


def test_upload_sends_the_csrf_token_and_another_sites_form_is_refused(
    site: Site, page: Page, tmp_path: Path
) -> None:
    page.goto(site.url + "/upload")
    _log_in(page, "boss", PASSWORD)
    expect(page).to_have_url(site.url + "/upload")
    study = generate_uid()
    files = [write_part10(ct_instance(study, seed=i), tmp_path / f"{i}.dcm") for i in range(2)]
    page.locator("#pick-files").set_input_files([str(f) for f in files])
    expect(page.locator("#upload-summary")).to_have_text("2 stored, 0 duplicate, 0 refused.")
    screenshot(page, "upload-logged-in")

    # The page's own token works; the same request without it is refused.
    without = page.evaluate(
        "async () => (await fetch('/dicomweb/studies', {method: 'POST'})).status"
    )
    assert without == 403

    # Another site's page posting a form to Hilum: the browser sends the session cookie
    # (same site: another port of the same host), not the token.
    with _evil_site(f"{site.url}/studies/{study}/jobs") as evil:
        page.goto(evil)
        page.get_by_role("button", name="Win a prize").click()
        expect(page.get_by_text("reload the page")).to_be_visible()
        assert page.url == f"{site.url}/studies/{study}/jobs"
    screenshot(page, "csrf-refused")


def test_failed_logins_are_throttled_per_user(site: Site, page: Page) -> None:
    page.goto(site.url + "/login")
    for _ in range(3):
        _log_in(page, "rad", "wrong password")
        expect(page.get_by_role("alert")).to_have_text(FAILED)
    _log_in(page, "rad", PASSWORD)  # even the right password, until the window has passed
    expect(page.get_by_role("alert")).to_have_text(
        re.compile(r"Too many failed logins\. Try again in \d+ minutes?\.")
    )
    screenshot(page, "login-throttled")
    _log_in(page, "tech", PASSWORD)  # another user from the same address may still log in
    expect(page.locator("#current-user")).to_have_text("tech")


def test_failed_logins_are_throttled_per_address(site: Site, page: Page) -> None:
    page.goto(site.url + "/login")
    for i in range(6):  # a different name each time: the per-user limit is never reached
        _log_in(page, f"guess{i}", "wrong password")
        expect(page.get_by_role("alert")).to_have_text(FAILED)
    _log_in(page, "tech", PASSWORD)
    expect(page.get_by_role("alert")).to_contain_text("Too many failed logins")


class _EvilPage(BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        body = (
            "<!doctype html><title>Prizes</title><form method=post action='"
            + self.target
            + "'><input type=hidden name=model value=ct_lesion_synthetic>"
            "<button>Win a prize</button></form>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _evil_site:  # noqa: N801 (a context manager used like a function)
    def __init__(self, target: str) -> None:
        handler = type("Handler", (_EvilPage,), {"target": target})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
