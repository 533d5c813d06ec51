"""One Hilum per test module, as ``hilum serve`` runs it (DIMSE SCP, HTTP with the UI, one AI
worker thread) on a temporary SQLite + files data directory, with studies sent by DCMTK storescu;
and Debian's chromium driven by Playwright (never a downloaded browser)."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from config import Settings
from inference.registry import load_models
from inference.worker import Worker
from server.app import HttpServer, create_app
from server.dimse.ae import DimseServer
from storage.archive import Archive, open_archive
from tests.conftest import free_port, make_settings
from tests.factories import DCMTK_STORESCU

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
]
ARTIFACTS = Path(__file__).parent / "artifacts"
INFERENCE = {"stable_after_s": 1, "poll_interval_s": 0.2, "retry_backoff_s": 0}


@dataclass
class Hilum:
    settings: Settings
    archive: Archive
    dimse: DimseServer
    http: HttpServer
    worker: Worker

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    def store(self, files: list[Path], *options: str) -> None:
        """Send ``files`` with DCMTK storescu, as a modality would."""
        sent = subprocess.run(
            [DCMTK_STORESCU, *options, "-aec", self.settings.dimse.ae_title, "127.0.0.1",
             str(self.dimse.port), *map(str, files)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr


@pytest.fixture(scope="module")
def hilum(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Hilum]:
    """Hilum for the module; a module's ``WEB_SETTINGS`` dict sets its ``[web]`` keys."""
    web = getattr(request.module, "WEB_SETTINGS", {})
    settings = make_settings(tmp_path_factory.mktemp("hilum"), inference=INFERENCE, web=web)
    archive = open_archive(settings, migrate=True)
    dimse = DimseServer(settings, archive)
    dimse.start()
    http = HttpServer(create_app(settings, archive), "127.0.0.1", free_port())
    http.start()
    worker = Worker(settings, archive, load_models(settings.inference.models_dirs))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield Hilum(settings, archive, dimse, http, worker)
    finally:
        stop.set()
        thread.join(120)
        http.stop()
        dimse.stop()
        archive.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make system-deps` (Debian package chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    violations = csp_violations(page)
    try:
        yield page
    finally:
        context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"
    assert violations == [], f"Content-Security-Policy refused: {violations}"


def csp_violations(page: Page) -> list[str]:
    """What the page's Content-Security-Policy refused, as Chromium reports it, from now on."""
    violations: list[str] = []

    def record(message: ConsoleMessage) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            violations.append(message.text)

    page.on("console", record)
    return violations


def screenshot(page: Page, name: str) -> Path:
    """Keep a screenshot of the page as a test artifact (tests/web/artifacts/, not committed)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
