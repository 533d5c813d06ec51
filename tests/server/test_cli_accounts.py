"""``hilum users`` and ``hilum tokens`` as an administrator runs them, and the refusal to serve
beyond loopback with authentication off: real processes."""

from __future__ import annotations

import io
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from config import Settings
from server.app import create_app
from server.cli import main
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


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def test_users_and_tokens_from_the_command_line(
    files_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    settings = files_settings
    for name, value in hilum_env(settings).items():
        if name.startswith("HILUM_"):
            monkeypatch.setenv(name, value)
    # main() in this process, leaving the test run's logging as it is.
    monkeypatch.setattr("server.cli._configure_logging", lambda verbose: None)

    def hilum(*args: str, stdin: str = "") -> Run:
        """The command in this process (its own process once below: quicker)."""
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = main(list(args))
        out, err = capsys.readouterr()
        return Run(code, out, err)

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
    files_settings: Settings,
    command: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    env = {
        **hilum_env(files_settings),
        "HILUM_SERVER__HOST": "0.0.0.0",
        "HILUM_DIMSE__ACCEPT_ANY_CALLING_AE": "true",
    }
    for name, value in env.items():
        if name.startswith("HILUM_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setattr("server.cli._configure_logging", lambda verbose: None)
    assert main([command]) == 2  # before anything is opened or bound (in this process: quick)
    refused = capsys.readouterr().err
    assert f"`hilum {command}` would listen on [server] host = '0.0.0.0'" in refused
    assert "[auth] enabled = true" in refused


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
