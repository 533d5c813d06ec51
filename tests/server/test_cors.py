"""CORS with real preflight requests (the Fetch standard's CORS protocol, as a browser sends
it): a wildcard lets any page read but never store, delete or send credentials; ``Origin:
null`` never matches; a listed origin may store and delete."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from config import load_settings
from config.settings import ConfigError
from server.app import HttpServer, create_app
from server.cors import cors_methods
from storage.archive import open_archive
from tests.conftest import free_port, make_settings

VIEWER = "https://viewer.example.org"
EVIL = "https://evil.example.net"


@pytest.fixture
def server_url(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """Hilum with ``cors_allowed_origins`` from the test's parameter, DELETE enabled."""
    settings = make_settings(
        tmp_path, http={"cors_allowed_origins": request.param, "allow_delete": True}
    )
    archive = open_archive(settings, migrate=True)
    server = HttpServer(create_app(settings, archive), "127.0.0.1", free_port())
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}/dicomweb"
    finally:
        server.stop()
        archive.close()


def preflight(url: str, origin: str, method: str, headers: str = "") -> requests.Response:
    sent = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        sent["Access-Control-Request-Headers"] = headers
    return requests.options(url, headers=sent, timeout=30)


def allows(response: requests.Response, origin: str, method: str) -> bool:
    """What a browser concludes from a preflight response (Fetch, CORS-preflight fetch)."""
    allowed_origin = response.headers.get("Access-Control-Allow-Origin")
    if allowed_origin not in ("*", origin):
        return False
    methods = {
        m.strip() for m in response.headers.get("Access-Control-Allow-Methods", "").split(",")
    }
    return method in methods or (method in ("GET", "HEAD", "POST") and allowed_origin is not None)


@pytest.mark.parametrize("server_url", [["*"]], indirect=True)
def test_a_wildcard_lets_any_page_read_but_never_store_or_delete(server_url: str) -> None:
    study = f"{server_url}/studies/1.2.3"
    read = preflight(f"{server_url}/studies", EVIL, "GET", "accept")
    assert read.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in read.headers
    assert allows(read, EVIL, "GET")
    assert read.headers["Access-Control-Allow-Methods"] == "GET, HEAD"

    delete = preflight(study, EVIL, "DELETE")
    assert "Access-Control-Allow-Origin" not in delete.headers
    assert not allows(delete, EVIL, "DELETE")
    # STOW-RS (multipart/related is not a CORS-safelisted type, so it is preflighted).
    store = preflight(f"{server_url}/studies", EVIL, "POST", "content-type")
    assert "Access-Control-Allow-Origin" not in store.headers
    assert not allows(store, EVIL, "POST")

    # The answer to the request itself: readable for GET, not for a state-changing method.
    got = requests.get(f"{server_url}/studies", headers={"Origin": EVIL}, timeout=30)
    assert got.headers["Access-Control-Allow-Origin"] == "*"
    assert "Origin" in got.headers["Vary"]
    deleted = requests.delete(study, headers={"Origin": EVIL}, timeout=30)
    assert "Access-Control-Allow-Origin" not in deleted.headers


@pytest.mark.parametrize("server_url", [["*", VIEWER]], indirect=True)
def test_origin_null_never_matches_and_a_listed_origin_may_store_and_delete(
    server_url: str,
) -> None:
    for method in ("GET", "POST", "DELETE"):
        refused = preflight(f"{server_url}/studies/1.2.3", "null", method)
        assert "Access-Control-Allow-Origin" not in refused.headers, method
    got = requests.get(f"{server_url}/studies", headers={"Origin": "null"}, timeout=30)
    assert "Access-Control-Allow-Origin" not in got.headers

    delete = preflight(f"{server_url}/studies/1.2.3", VIEWER, "DELETE", "authorization")
    assert delete.headers["Access-Control-Allow-Origin"] == VIEWER
    assert delete.headers["Access-Control-Allow-Credentials"] == "true"
    assert allows(delete, VIEWER, "DELETE")
    assert delete.headers["Access-Control-Allow-Headers"] == "authorization"
    store = preflight(f"{server_url}/studies", VIEWER, "POST", "content-type")
    assert allows(store, VIEWER, "POST")
    # The wildcard still reads for everyone else, without credentials.
    assert (
        preflight(f"{server_url}/studies", EVIL, "GET").headers["Access-Control-Allow-Origin"]
        == "*"
    )


@pytest.mark.parametrize("server_url", [[VIEWER]], indirect=True)
def test_an_origin_not_listed_gets_nothing(server_url: str) -> None:
    for method in ("GET", "DELETE"):
        response = preflight(f"{server_url}/studies", EVIL, method)
        assert "Access-Control-Allow-Origin" not in response.headers
    assert allows(preflight(f"{server_url}/studies", VIEWER, "GET"), VIEWER, "GET")


def test_with_logins_on_a_wildcard_gives_nothing_and_listed_origins_still_work(
    tmp_path: Path,
) -> None:
    """Once [auth] is on, CORS is for listed origins only (issue 12): "*" is ignored."""
    settings = make_settings(
        tmp_path, auth={"enabled": True}, http={"cors_allowed_origins": ["*", VIEWER]}
    )
    archive = open_archive(settings, migrate=True)
    server = HttpServer(create_app(settings, archive), "127.0.0.1", free_port())
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/dicomweb/studies"
        assert "Access-Control-Allow-Origin" not in preflight(url, EVIL, "GET").headers
        assert allows(preflight(url, VIEWER, "GET", "Authorization"), VIEWER, "GET")
    finally:
        server.stop()
        archive.close()


def test_which_methods_each_origin_gets() -> None:
    assert cors_methods(VIEWER, ["*"]) == ("GET", "HEAD")
    assert cors_methods(VIEWER, [VIEWER]) == ("GET", "HEAD", "POST", "PUT", "DELETE")
    assert cors_methods(EVIL, [VIEWER]) == ()
    assert cors_methods("null", ["*"]) == ()
    assert cors_methods(None, ["*"]) == ()
    assert cors_methods("", ["*"]) == ()


@pytest.mark.parametrize(
    "origin", ["null", "https://viewer.example.org/", "viewer.example.org", "https://a/b"]
)
def test_a_listed_value_that_is_no_origin_is_a_configuration_error(origin: str) -> None:
    with pytest.raises(ConfigError, match="not an origin"):
        load_settings(None, http={"cors_allowed_origins": [origin]})
