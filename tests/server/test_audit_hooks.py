"""Security events in the audit trail (issue 13): logins over the UI (success and failure),
changes through the admin API, and users, tokens and AE permissions changed with ``hilum``
commands, each recorded with who made it and from where."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from server.app import create_app
from storage.accounts import Accounts
from storage.archive import open_archive
from storage.audit import AuditSearch, search_records, verify_chain
from tests.conftest import make_settings
from tests.server.test_cli import HILUM, hilum_env

PASSWORD = "radiology rocks 42"


def _records(archive, event: str) -> list[dict]:
    found = search_records(archive.index, AuditSearch(limit=1000))
    return [r for r in reversed(found) if r["event"] == event]


def test_logins_and_admin_changes_are_recorded(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, auth={"enabled": True})
    archive = open_archive(settings, migrate=True)
    try:
        accounts = Accounts(archive.index)
        accounts.add_account("boss", "admin", password=PASSWORD)
        client = create_app(settings, archive).test_client()

        def log_in(password: str) -> int:
            page = client.get("/login").get_data(as_text=True)
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
            assert csrf is not None
            form = {"username": "boss", "password": password, "csrf_token": csrf.group(1)}
            return client.post("/login", data=form).status_code

        assert log_in("wrong") == 401
        assert log_in(PASSWORD) == 303
        failed, succeeded = _records(archive, "login")
        assert (failed["outcome"], failed["principal_name"]) == (4, "anonymous")
        assert '"user":"boss"' in failed["detail"] and PASSWORD not in failed["detail"]
        assert (succeeded["outcome"], succeeded["address"]) == (0, "127.0.0.1")

        token = accounts.create_token("boss", expires_days=1)[1]
        bearer = {"Authorization": f"Bearer {token}"}
        peer = {"host": "10.1.2.3", "port": 104}
        assert client.put("/api/admin/peers/VIEWER", json=peer, headers=bearer).status_code == 201
        assert client.put("/api/admin/peers/V", json={}, headers=bearer).status_code == 400
        changes = _records(archive, "config-change")
        assert [(r["principal_name"], r["outcome"]) for r in changes] == [
            ("boss", 0),  # the change, recorded before it was made
            ("boss", 0),  # the refused one: asked for ...
            ("boss", 4),  # ... and refused, with the reason
        ]
        assert "PUT /api/admin/peers/VIEWER" in changes[0]["detail"]
        assert "answered 400" in changes[2]["reason"]
        assert verify_chain(archive.index).fault is None
    finally:
        archive.close()


def test_users_tokens_and_ae_permissions_changed_by_commands_are_recorded(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    open_archive(settings, migrate=True).close()

    def hilum(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [*HILUM, *args], env=hilum_env(settings), input=stdin, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip

    assert hilum("users", "add", "ada", "--role", "radiologist", "--password-stdin",
                 stdin=PASSWORD + "\n").returncode == 0  # fmt: skip
    created = hilum("tokens", "create", "--user", "ada")
    assert created.returncode == 0, created.stderr
    assert hilum("ae", "add", "CT_A", "--store").returncode == 0
    assert hilum("ae", "list").returncode == 0  # a read: not a change
    archive = open_archive(settings)
    try:
        (user,) = _records(archive, "user-change")
        (token,) = _records(archive, "token-change")
        (ae,) = _records(archive, "config-change")
    finally:
        archive.close()
    for record in (user, token, ae):
        assert record["principal_name"].startswith("os:") and record["transport"] == "cli"
    assert '"subject":"ada"' in user["detail"] and "role radiologist" in user["detail"]
    assert created.stdout.strip() not in token["detail"]  # the token's id, never its secret
    assert "ae add CT_A --store" in ae["detail"]


def test_reads_of_the_json_api_and_fhir_are_recorded(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    archive = open_archive(settings, migrate=True)
    try:
        client = create_app(settings, archive).test_client()
        study = "1.2.826.0.1.3680043.8.498.1"
        assert client.get(f"/api/studies/{study}/findings").status_code == 200
        assert client.get("/api/jobs?state=failed").status_code == 200
        assert client.get(f"/fhir/ImagingStudy?identifier=urn:oid:{study}").status_code == 200
        assert client.get("/fhir/metadata").status_code == 200  # no patient data: not recorded
        queries = _records(archive, "query")
    finally:
        archive.close()
    assert [(r["study_uids"], '"service":"JSON API"' in r["detail"]) for r in queries[:2]] == [
        (study, True),
        ("", True),
    ]
    assert "state" in queries[1]["detail"] and "failed" in queries[1]["detail"]
    (fhir,) = queries[2:]
    assert '"service":"FHIR"' in fhir["detail"] and study in fhir["detail"]
