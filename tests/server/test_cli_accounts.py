"""``hilum users`` and ``hilum tokens`` as an administrator runs them, and the refusal to serve
beyond loopback with authentication off: real processes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from config import Settings
from server.app import create_app
from storage.archive import open_archive
from tests.conftest import make_settings
from tests.server.test_cli import HILUM, hilum_env


def _hilum(
    settings: Settings, *args: str, stdin: str = "", **env: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HILUM, *args], env=hilum_env(settings, **env), input=stdin, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture
def files_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


def test_users_and_tokens_from_the_command_line(files_settings: Settings) -> None:
    settings = files_settings
    open_archive(settings, migrate=True).close()

    def hilum(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return _hilum(settings, *args, stdin=stdin)

    assert hilum("partitions", "create", "hospital-a").returncode == 0
    password = "a long enough password"
    added = hilum(
        "users", "add", "rad", "--role", "radiologist", "--partition", "hospital-a",
        "--password-stdin", stdin=password + "\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "user rad added: role radiologist, hospital-a, password login" in added.stdout
    assert hilum("users", "add", "gw", "--role", "modality").returncode == 0
    unknown = hilum("users", "add", "x", "--role", "superuser")
    assert unknown.returncode == 2 and "unknown role 'superuser'" in unknown.stderr
    again = hilum("users", "add", "gw", "--role", "modality")
    assert again.returncode != 0 and "exists already" in again.stderr
    short = hilum("users", "add", "y", "--role", "admin", "--password-stdin", stdin="short\n")
    assert short.returncode != 0 and "at least 8 characters" in short.stderr

    listed = hilum("users", "list").stdout.splitlines()
    assert listed == [
        "gw\tmodality\t*\tenabled\tno password",
        "rad\tradiologist\thospital-a\tenabled\tpassword",
    ]

    # A real process: the token alone on one line of its standard output.
    created = _hilum(settings, "tokens", "create", "--user", "gw", "--expires-days", "30")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert created.stdout == token + "\n" and token.startswith("hilum_")
    token_id = created.stderr.split()[1]
    assert token not in created.stderr
    tokens = hilum("tokens", "list").stdout
    assert f"{token_id}\tgw\tvalid" in tokens and token not in tokens

    # The token works over HTTP, until revoked (a fresh app: nothing cached).
    auth_on = settings.auth.model_copy(update={"enabled": True})

    def status() -> int:
        archive = open_archive(settings)
        try:
            app = create_app(settings.model_copy(update={"auth": auth_on}), archive)
            response = app.test_client().post(
                "/dicomweb/studies", headers={"Authorization": f"Bearer {token}"}
            )
            return response.status_code
        finally:
            archive.close()

    assert status() == 415  # authenticated, allowed to store; the empty body is refused
    revoked = hilum("tokens", "revoke", token_id)
    assert revoked.returncode == 0 and f"token {token_id} of user gw revoked" in revoked.stdout
    assert f"{token_id}\tgw\trevoked" in hilum("tokens", "list").stdout
    assert status() == 401

    disabled = hilum("users", "disable", "rad")
    assert disabled.returncode == 0 and "user rad disabled" in disabled.stdout
    assert "rad\tradiologist\thospital-a\tdisabled" in hilum("users", "list").stdout
    refused = hilum("tokens", "create", "--user", "rad")
    assert refused.returncode != 0 and "disabled" in refused.stderr
    for output in (added, created, revoked, disabled):  # never a secret in what is printed
        assert password not in output.stdout + output.stderr


@pytest.mark.parametrize("command", ["serve", "web", "dimse"])
def test_no_listening_beyond_loopback_without_authentication(
    files_settings: Settings, command: str
) -> None:
    refused = _hilum(
        files_settings, command,
        HILUM_SERVER__HOST="0.0.0.0", HILUM_DIMSE__ACCEPT_ANY_CALLING_AE="true",
    )  # fmt: skip
    assert refused.returncode == 2  # before anything is opened or bound
    assert f"`hilum {command}` would listen on [server] host = '0.0.0.0'" in refused.stderr
    assert "[auth] enabled = true" in refused.stderr


def test_insecure_allow_unauthenticated_starts_with_a_warning(files_settings: Settings) -> None:
    env = hilum_env(
        files_settings,
        HILUM_SERVER__HOST="0.0.0.0",
        HILUM_DIMSE__ACCEPT_ANY_CALLING_AE="true",
        HILUM_AUTH__INSECURE_ALLOW_UNAUTHENTICATED="true",
    )
    assert _hilum(files_settings, "db", "upgrade").returncode == 0
    server = subprocess.Popen(
        [*HILUM, "dimse"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stderr is not None
        assert "Hilum is listening" in server.stdout.readline()
    finally:
        server.terminate()
        server.wait(30)
    warning = server.stderr.read()
    assert "WARNING" in warning and "authentication is OFF while listening on 0.0.0.0" in warning
