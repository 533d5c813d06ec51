"""OpenID Connect bearer JWTs: a key set generated here, served by a local HTTP server with a
discovery document, as a hospital's provider serves them; tokens signed here."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask

from server.app import create_app
from storage.archive import Archive, open_archive
from tests.conftest import make_settings

AUDIENCE = "hilum-test"
LOGIN_CODE = "code-of-one-login"


@dataclass
class Provider:
    issuer: str
    key: rsa.RSAPrivateKey
    requests: list[str]
    logins: dict[str, dict[str, str]]

    def token(self, key: rsa.RSAPrivateKey | None = None, kid: str = "k1", **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "3f1c9e",
            "preferred_username": "dr.house",
            "iat": now,
            "exp": now + 300,
            "roles": ["radiologist"],
            **claims,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key or self.key, algorithm="RS256", headers={"kid": kid})


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    keys = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()
    requests: list[str] = []
    logins: dict[str, dict[str, str]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            if self.path == "/.well-known/openid-configuration":
                body = json.dumps(
                    {
                        "issuer": issuer,
                        "jwks_uri": f"{issuer}/jwks.json",
                        "authorization_endpoint": f"{issuer}/authorize",
                        "token_endpoint": f"{issuer}/token",
                    }
                ).encode()
            elif self.path == "/jwks.json":
                body = keys
            elif self.path.startswith("/authorize?"):
                # The user logs in at the provider, which sends the browser back with a code.
                query = dict(urllib.parse.parse_qsl(self.path.partition("?")[2]))
                logins[LOGIN_CODE] = query
                back = urllib.parse.urlencode({"code": LOGIN_CODE, "state": query["state"]})
                self.send_response(302)
                self.send_header("Location", f"{query['redirect_uri']}?{back}")
                self.end_headers()
                return
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            requests.append(self.path)
            length = int(self.headers["Content-Length"])
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            login = logins.pop(form.get("code", ""), None)
            verifier = form.get("code_verifier", "").encode()
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=")
            if (
                self.path != "/token"
                or login is None
                or form.get("grant_type") != "authorization_code"
                or form.get("redirect_uri") != login["redirect_uri"]
                or form.get("client_id") != login["client_id"]
                or challenge.decode() != login["code_challenge"]  # RFC 7636 4.6
            ):
                self.send_error(400)
                return
            provider = Provider(issuer, key, requests, logins)
            id_token = provider.token(nonce=login["nonce"], aud=login["client_id"])
            body = json.dumps({"id_token": id_token, "token_type": "Bearer"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    issuer = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Provider(issuer, key, requests, logins)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    settings = make_settings(tmp_path_factory.mktemp("oidc"))
    archive = open_archive(settings, migrate=True)
    try:
        yield archive
    finally:
        archive.close()


def _app(archive: Archive, tmp_path: Path, **oidc: Any) -> Flask:
    settings = make_settings(
        tmp_path, auth={"enabled": True, "oidc": {"audience": AUDIENCE, **oidc}}
    )
    return create_app(settings, archive)


def _status(app: Flask, token: str, path: str = "/dicomweb/studies") -> int:
    with app.test_client().get(path, headers={"Authorization": f"Bearer {token}"}) as response:
        response.get_data()
        return response.status_code


def test_tokens_of_the_provider_are_accepted_through_discovery(
    provider: Provider, archive: Archive, tmp_path: Path
) -> None:
    app = _app(archive, tmp_path, issuer=provider.issuer)  # jwks_url from discovery
    assert _status(app, provider.token()) == 200
    assert "/.well-known/openid-configuration" in provider.requests
    assert "/jwks.json" in provider.requests
    # A radiologist may query, not store.
    response = app.test_client().post(
        "/dicomweb/studies", headers={"Authorization": f"Bearer {provider.token()}"}
    )
    assert response.status_code == 403


def test_refused_tokens(provider: Provider, archive: Archive, tmp_path: Path) -> None:
    app = _app(archive, tmp_path, issuer=provider.issuer, jwks_url=f"{provider.issuer}/jwks.json")
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = provider.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    refused = {
        "wrong issuer": provider.token(iss="https://evil.example"),
        "wrong audience": provider.token(aud="another-app"),
        "expired": provider.token(iat=now - 3600, exp=now - 600),
        "not yet valid": provider.token(nbf=now + 600),
        "no expiry": provider.token(exp=None),
        "wrong key": provider.token(key=other_key),
        "unknown key id": provider.token(kid="k2"),
        "unsigned": jwt.encode(
            {"iss": provider.issuer, "aud": AUDIENCE, "sub": "x", "exp": now + 300},
            None,
            algorithm="none",
            headers={"kid": "k1"},
        ),
        # The public key used as an HMAC secret (algorithm confusion).
        "HS256 with the public key": _hs256(provider, public_pem),
        "tampered": _tampered(provider.token()),
    }
    assert _status(app, provider.token()) == 200
    for what, token in refused.items():
        assert _status(app, token) == 401, what


def test_roles_and_partitions_come_from_the_configured_claims(
    provider: Provider, archive: Archive, tmp_path: Path
) -> None:
    app = _app(
        archive,
        tmp_path,
        issuer=provider.issuer,
        roles_claim="realm_access.roles",
        partitions_claim="hilum_partitions",
    )
    nested = provider.token(roles=None, realm_access={"roles": ["offline_access", "technologist"]})
    assert _status(app, nested) == 200
    no_role = provider.token(roles=None, realm_access={"roles": ["offline_access"]})
    assert _status(app, no_role) == 403  # authenticated, no Hilum role
    other_partition = provider.token(
        roles=None, realm_access={"roles": ["technologist"]}, hilum_partitions=["hospital-b"]
    )
    assert _status(app, other_partition) == 404  # /dicomweb is the default partition
    default_partition = provider.token(
        roles=None, realm_access={"roles": ["technologist"]}, hilum_partitions=["default"]
    )
    assert _status(app, default_partition) == 200


def _hs256(provider: Provider, secret: bytes) -> str:
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    now = int(time.time())
    claims = {"iss": provider.issuer, "aud": AUDIENCE, "sub": "x", "exp": now + 300,
              "roles": ["admin"]}  # fmt: skip
    payload = b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def _tampered(token: str) -> str:
    import base64

    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def test_browser_login_with_the_authorization_code_flow(
    provider: Provider, archive: Archive, tmp_path: Path
) -> None:
    import requests as http

    app = _app(
        archive, tmp_path, issuer=provider.issuer, browser_login=True, client_id="hilum-ui",
        roles_claim="roles",
    )  # fmt: skip
    client = app.test_client()
    login_page = client.get("/login?next=/jobs").get_data(as_text=True)
    assert "Log in with your organisation" in login_page
    started = client.get("/login/oidc?next=/jobs")
    assert started.status_code == 303
    authorize = started.headers["Location"]
    assert authorize.startswith(f"{provider.issuer}/authorize?")
    query = dict(urllib.parse.parse_qsl(authorize.partition("?")[2]))
    assert query["client_id"] == "hilum-ui" and query["code_challenge_method"] == "S256"
    assert query["redirect_uri"] == "http://localhost/login/oidc/callback"
    # The browser at the provider, sent back to Hilum with a code.
    back = http.get(authorize, allow_redirects=False, timeout=10).headers["Location"]
    forged_state = back.replace(query["state"], "another-state")
    assert client.get(forged_state.removeprefix("http://localhost")).status_code == 400
    # A refused state ends that flow: start again.
    authorize = client.get("/login/oidc?next=/jobs").headers["Location"]
    back = http.get(authorize, allow_redirects=False, timeout=10).headers["Location"]
    finished = client.get(back.removeprefix("http://localhost"))
    assert finished.status_code == 303 and finished.headers["Location"] == "/jobs"
    page = client.get("/jobs")
    assert page.status_code == 200  # a radiologist may see the AI jobs
    assert 'id="current-user">dr.house<' in page.get_data(as_text=True)
    assert client.post("/api/jobs/1/rerun").status_code == 403  # no CSRF token
    # The callback cannot be replayed: its flow ended with the login.
    assert client.get(back.removeprefix("http://localhost")).status_code == 400
