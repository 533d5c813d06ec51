"""The access check of every HTTP route: one permission table, every rule of the app called with
no credentials, with a token of each role, and with expired, revoked and forged tokens.

A route added without ``@requires``, or without a line in ``PERMISSIONS``, fails
``test_every_route_names_its_action``; a route whose check does not match its line fails
``test_every_route_answers_each_role_as_the_table_says``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.routing import Rule

from config import Settings
from server.access import ROLE_ACTIONS, Action, required_action
from server.app import UI_BLUEPRINTS, create_app
from server.authentication import Authenticator
from storage.accounts import Accounts
from storage.archive import Archive, open_archive
from tests.conftest import S3Server, make_settings, s3_blob_url
from tests.factories import ensure_partition

Q, R, S, D = Action.QUERY, Action.RETRIEVE, Action.STORE, Action.DELETE
J, V, P, A = Action.JOBS, Action.REVIEW, Action.PUBLIC, Action.ADMIN
# A family of routes registered at a partition's root too (/partitions/<partition>/…) has the
# same endpoints with this prefix, and needs the same actions.
PARTITION_PREFIX = "partition_"

# endpoint -> the action it needs: the one permission table of the HTTP interfaces.
PERMISSIONS: dict[str, Action] = {
    # DICOMweb (PS3.18): QIDO-RS, WADO-RS, rendered / thumbnails, STOW-RS, DELETE, WADO-URI
    "dicomweb.qido.search_for_studies": Q,
    "dicomweb.qido.search_for_series": Q,
    "dicomweb.qido.search_for_instances": Q,
    "dicomweb.wado.retrieve_study": R,
    "dicomweb.wado.retrieve_series": R,
    "dicomweb.wado.retrieve_instance": R,
    "dicomweb.wado.retrieve_study_metadata": R,
    "dicomweb.wado.retrieve_series_metadata": R,
    "dicomweb.wado.retrieve_instance_metadata": R,
    "dicomweb.wado.retrieve_frames": R,
    "dicomweb.wado.retrieve_bulkdata": R,
    "dicomweb.rendered.retrieve_instance_rendered": R,
    "dicomweb.rendered.retrieve_frames_rendered": R,
    "dicomweb.rendered.retrieve_series_rendered": R,
    "dicomweb.rendered.retrieve_study_thumbnail": R,
    "dicomweb.rendered.retrieve_series_thumbnail": R,
    "dicomweb.rendered.retrieve_instance_thumbnail": R,
    "dicomweb.rendered.retrieve_frames_thumbnail": R,
    "dicomweb.stow.store_instances": S,
    "dicomweb.delete.delete_study": D,
    "dicomweb.delete.delete_series": D,
    "dicomweb.delete.delete_instance": D,
    "wado_uri.retrieve_object": R,
    # The JSON API
    "jobs.list_study_jobs": J,
    "jobs.search_jobs": J,
    "jobs.run_model_on_study": J,
    "jobs.retrieve_job": J,
    "jobs.rerun_job": J,
    "jobs.list_study_findings": Q,
    "jobs.search_all_reviews": Q,
    "jobs.list_study_reviews": Q,
    # The browser UI
    "pages.worklist": Q,
    "pages.worklist_rows": Q,
    "pages.study_page": Q,
    "pages.run_model": J,
    "pages.review_finding": V,
    "pages.jobs": J,
    "pages.upload": S,
    "pages.slide": R,
    "pages.dicom_access": A,
    "web.viewer": R,
    "web.viewer_app_config": R,
    "web.viewer_file": R,
    "web.static": P,
    "login.login_page": P,
    "login.log_in": P,
    "login.log_out": P,
    "login.oidc_login": P,
    "login.oidc_callback": P,
    # Administration: partitions, DIMSE AE permissions, C-MOVE destinations; pseudonyms
    "audit.search_audit_records": A,
    "audit_page.audit_page": A,
    "admin.list_all_partitions": A,
    "admin.create_a_partition": A,
    "admin.add_a_partition_ae_title": A,
    "admin.remove_a_partition_ae_title": A,
    "admin.list_all_ae_permissions": A,
    "admin.set_an_ae_permission": A,
    "admin.remove_ae_permissions": A,
    "admin.list_all_peers": A,
    "admin.set_a_peer": A,
    "admin.remove_a_peer": A,
    "admin.list_all_cors_origins": A,
    "admin.add_a_cors_origin": A,
    "admin.remove_a_cors_origin": A,
    "research.find_identities": A,
    # The change feed and its deliveries; FHIR R4
    "events.list_changes": Q,
    "events.list_webhooks": A,
    "events.list_dead_letters": A,
    "events.replay_dead_letter": A,
    "fhir.capability_statement": P,
    "fhir.read": Q,
    "fhir.search_type": Q,
    # Monitoring: probes and Prometheus (counts and durations, no patient data)
    "monitoring.liveness": P,
    "monitoring.readiness": P,
    "monitoring.prometheus_metrics": P,
}

# A value for each URL variable of the app's rules (valid, so that the check is what answers).
ARGUMENTS = {
    "study": "1.2.3",
    "series": "1.2.3.4",
    "instance": "1.2.3.4.5",
    "frames": "1",
    "path": "00420011",
    "study_instance_uid": "1.2.3",
    "study_uid": "1.2.3",
    "job_id": 1,
    "_route": "x",
    "_name": "x",
    "filename": "hilum.css",
    "partition": "default",  # /partitions/default/…: the default partition by name
    "series_uid": "1.2.3.4",
    "name": "default",
    "title": "SOME_AE",
    "dead_letter_id": 1,
    "resource_type": "Patient",
    "resource_id": "patient-1",
}


@dataclass
class AccessApp:
    settings: Settings
    archive: Archive
    app: Flask
    tokens: dict[str, str]  # role -> a valid token
    bad_tokens: dict[str, str]  # "expired" / "revoked" / "forged" -> token


@pytest.fixture(scope="module")
def access(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccessApp]:
    settings = make_settings(
        tmp_path_factory.mktemp("access"), auth={"enabled": True}, http={"allow_delete": True}
    )
    archive = open_archive(settings, migrate=True)
    accounts = Accounts(archive.index)
    tokens = {}
    for role in ROLE_ACTIONS:
        accounts.add_account(f"a-{role}", role)
        tokens[role] = accounts.create_token(f"a-{role}", expires_days=1)[1]
    long_ago = datetime.now(UTC) - timedelta(days=10)
    expired = Accounts(archive.index, clock=lambda: long_ago).create_token("a-admin", 1)[1]
    revoked_id, revoked = accounts.create_token("a-admin")
    accounts.revoke_token(revoked_id.id)
    forged = tokens["admin"][:-4] + ("AAAA" if not tokens["admin"].endswith("AAAA") else "BBBB")
    bad = {"expired": expired, "revoked": revoked, "forged": forged}
    try:
        yield AccessApp(settings, archive, create_app(settings, archive), tokens, bad)
    finally:
        archive.close()


def _rules(app: Flask) -> list[Rule]:
    return sorted(app.url_map.iter_rules(), key=lambda rule: (rule.rule, rule.endpoint))


def _url(rule: Rule) -> str:
    return re.sub(r"<(?:[a-z]+:)?(\w+)>", lambda m: str(ARGUMENTS[m.group(1)]), rule.rule)


def _calls(app: Flask) -> Iterator[tuple[Rule, str, str]]:
    for rule in _rules(app):
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield rule, method, _url(rule)


def _entry(endpoint: str) -> str:
    """The endpoint's line in the table: a partition root's endpoint is its family's."""
    return endpoint.removeprefix(PARTITION_PREFIX)


def test_every_route_names_its_action(access: AccessApp) -> None:
    app = access.app
    for rule in _rules(app):
        view = app.view_functions[rule.endpoint]
        entry = _entry(rule.endpoint)
        assert entry in PERMISSIONS, f"{rule.rule} ({rule.endpoint}) is not in the table"
        assert required_action(view) is PERMISSIONS[entry], (
            f"{rule.rule} ({rule.endpoint}) needs {required_action(view)}, the table says "
            f"{PERMISSIONS[entry]}"
        )
    routed = {_entry(rule.endpoint) for rule in _rules(app)}
    assert routed == set(PERMISSIONS), f"no longer routed: {set(PERMISSIONS) - routed}"


def _call(client: FlaskClient, method: str, url: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    with client.open(url, method=method, headers=headers) as response:
        response.get_data()  # a streamed body runs to its end, inside its request
        return response


def test_every_route_answers_each_role_as_the_table_says(access: AccessApp) -> None:
    client = access.app.test_client()
    checked = 0
    for rule, method, url in _calls(access.app):
        action = PERMISSIONS[_entry(rule.endpoint)]
        where = f"{method} {url} ({rule.endpoint}, {action})"
        response = _call(client, method, url)
        if action is P and method == "POST":
            # /login, /logout: browser forms, refused without the session's CSRF token (their
            # own tests in tests/web/test_login.py); a token changes nothing for them.
            assert response.status_code == 403, where
            assert b"reload the page" in response.data, where
            checked += 1
            continue
        if action is P:
            assert response.status_code not in (401, 403), where
        elif rule.endpoint.split(".")[0] in UI_BLUEPRINTS:
            # A page, or a page's form: the browser is sent to log in, and back afterwards.
            assert response.status_code == 303, where
            assert response.headers["Location"].startswith("/login?next="), where
        else:
            assert response.status_code == 401, where
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="hilum"', where
        for role, token in access.tokens.items():
            response = _call(client, method, url, token)
            may = action is P or action in ROLE_ACTIONS[role]
            if may:
                assert response.status_code not in (401, 403), f"{where} as {role}"
            else:
                assert response.status_code == 403, f"{where} as {role}"
        for kind, token in access.bad_tokens.items():
            response = _call(client, method, url, token)
            if action is P:
                assert response.status_code not in (401, 403), f"{where} with a {kind} token"
            else:
                assert response.status_code == 401, f"{where} with a {kind} token"
                assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        checked += 1
    assert checked >= len(PERMISSIONS)


def test_other_schemes_and_empty_tokens_are_refused(access: AccessApp) -> None:
    client = access.app.test_client()
    for header in ("Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer ", "Token abc", "bearer hilum_x"):
        response = client.get("/dicomweb/studies", headers={"Authorization": header})
        assert response.status_code == 401, header
    # The scheme is case-insensitive (RFC 9110 11.1).
    token = access.tokens["radiologist"]
    response = client.get("/dicomweb/studies", headers={"Authorization": f"bearer {token}"})
    assert response.status_code == 200


def test_a_route_without_an_action_is_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)  # authentication off: still refused
    archive = open_archive(settings, migrate=True)
    try:
        app = create_app(settings, archive)

        @app.get("/forgotten")
        def forgotten() -> str:
            return "open"

        response = app.test_client().get("/forgotten")
        assert response.status_code == 403
        assert b"no access rule" in response.data
    finally:
        archive.close()


def test_authentication_off_allows_everything_as_before(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, http={"allow_delete": True})
    archive = open_archive(settings, migrate=True)
    try:
        client = create_app(settings, archive).test_client()
        assert client.get("/dicomweb/studies").status_code == 200
        assert client.get("/").status_code == 200
        assert client.delete("/dicomweb/studies/1.2.3").status_code == 404  # none such
        assert client.post("/api/jobs/1/rerun").status_code == 404  # no CSRF token needed
        assert client.get("/login").status_code == 303  # nothing to log in to
        assert "Set-Cookie" not in client.get("/").headers
    finally:
        archive.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_revocation_and_disabling_take_effect_within_the_cache_ttl(access: AccessApp) -> None:
    accounts = Accounts(access.archive.index)
    accounts.add_account("short-lived", "technologist")
    record, token = accounts.create_token("short-lived")
    second_record, second = accounts.create_token("short-lived")
    clock = Clock()
    authenticator = Authenticator(access.settings.auth, accounts, clock=clock)
    principal = authenticator.bearer(token)
    assert principal is not None and principal.roles == {"technologist"}
    assert principal.token_id == record.id
    accounts.revoke_token(record.id)
    assert authenticator.bearer(token) is not None  # remembered, for up to the TTL
    clock.now += access.settings.auth.token_cache_ttl_s + 0.001
    assert authenticator.bearer(token) is None  # revoked
    assert authenticator.bearer(second) is not None
    accounts.disable_account("short-lived")
    clock.now += access.settings.auth.token_cache_ttl_s + 0.001
    assert authenticator.bearer(second) is None  # its account disabled
    assert authenticator.session_user("short-lived") is None


def test_a_cached_token_is_refused_once_it_expires(access: AccessApp) -> None:
    accounts = Accounts(access.archive.index)
    accounts.add_account("expiring", "radiologist")
    record, token = accounts.create_token("expiring", expires_days=1)
    assert record.expires_at is not None
    clock = Clock()
    clock.now = record.expires_at.timestamp() - 1
    at = Accounts(access.archive.index, clock=lambda: datetime.fromtimestamp(clock.now, UTC))
    authenticator = Authenticator(access.settings.auth, at, clock=clock)
    assert authenticator.bearer(token) is not None
    clock.now += 2  # past the expiry, well within the TTL: the cache does not outlive it
    assert authenticator.bearer(token) is None


def test_a_partition_bound_token_is_refused_other_partitions(access: AccessApp) -> None:
    accounts = Accounts(access.archive.index)
    ensure_partition(access.archive.index, "hospital-a")
    accounts.add_account("hospital-a", "radiologist", partitions=["hospital-a"])
    token = accounts.create_token("hospital-a")[1]
    client = access.app.test_client()
    # /dicomweb is the default partition: absent for a user of hospital-a only.
    response = client.get("/dicomweb/studies", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 404


def test_secrets_never_reach_the_logs(access: AccessApp, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    accounts = Accounts(access.archive.index)
    password = "correct horse battery staple"
    accounts.add_account("logged", "radiologist", password=password)
    token = accounts.create_token("logged")[1]
    client = access.app.test_client()
    client.get("/dicomweb/studies", headers={"Authorization": f"Bearer {token}"})
    client.get("/dicomweb/studies", headers={"Authorization": f"Bearer {token}x"})
    page = client.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf is not None
    for attempt in ("wrong password!", password):
        client.post(
            "/login", data={"username": "logged", "password": attempt, "csrf_token": csrf[1]}
        )
    cookie = client.get_cookie("hilum_session")
    assert cookie is not None and client.get("/").status_code == 200
    secret = access.settings.auth.secret_for_sessions(access.settings.server.data_dir).decode()
    logged = caplog.text
    assert "login: user logged" in logged  # the logs were captured
    for value in (password, "wrong password!", token, cookie.value, secret):
        assert value not in logged


def test_accounts_and_tokens_on_postgresql_and_s3(
    postgres_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    settings = make_settings(
        tmp_path, database_url=postgres_url, blob_url=s3_blob_url(s3_server),
        auth={"enabled": True, "token_cache_ttl_s": 0},
    )  # fmt: skip
    archive = open_archive(settings, migrate=True)
    try:
        accounts = Accounts(archive.index)
        ensure_partition(archive.index, "research")
        accounts.add_account("pg-user", "technologist", partitions=["default", "research"])
        record, token = accounts.create_token("pg-user", expires_days=7)
        assert accounts.account("pg-user") == accounts.accounts()[0]
        assert accounts.accounts()[0].partitions == ("default", "research")
        client = create_app(settings, archive).test_client()
        bearer = {"Authorization": f"Bearer {token}"}
        assert client.get("/dicomweb/studies", headers=bearer).status_code == 200
        assert client.delete("/dicomweb/studies/1.2.3", headers=bearer).status_code == 403
        accounts.revoke_token(record.id)
        assert client.get("/dicomweb/studies", headers=bearer).status_code == 401  # TTL 0
    finally:
        archive.close()
