"""The audit trail end to end: each action a client performs over DIMSE (DCMTK storescu and
findscu, a pynetdicom C-GET), DICOMweb (dicomweb-client), the UI and the CLI leaves exactly its
records; `hilum audit verify` passes, then fails after a record is deleted behind Hilum's back;
and with INSERT on the audit table revoked (a real permission change on the real PostgreSQL)
every access is refused, none served unaudited."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from config import Settings
from server.app import HttpServer, create_app
from server.dimse.ae import DimseServer
from storage.archive import Archive, open_archive
from storage.audit import AuditSearch, search_records
from tests.conftest import free_port, make_settings, postgres_database
from tests.factories import ct_instance, write_part10
from tests.server.dimse.qr_seed import storescp
from tests.server.dimse.scu import associate, storescu
from tests.server.dimse.test_c_get import get_responses
from tests.server.test_cli import hilum_env
from tests.waiting import wait_until

HILUM = [sys.executable, "-m", "server.cli"]
FINDSCU = "/usr/bin/findscu"
IMPLICIT = "1.2.840.10008.1.2"


@dataclass
class Running:
    settings: Settings
    archive: Archive
    dimse: DimseServer
    http: HttpServer
    seen: int = 0  # the last record already looked at

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    @property
    def dicomweb(self) -> DICOMwebClient:
        return DICOMwebClient(f"{self.url}/dicomweb")

    def new_records(self, expected: int) -> list[dict[str, Any]]:
        """The records written since the last call, oldest first; exactly ``expected`` (a
        DIMSE transfer's end is recorded as its association closes: waited for)."""

        def fetch() -> list[dict[str, Any]]:
            found = search_records(self.archive.index, AuditSearch(limit=1000))
            return sorted((r for r in found if r["id"] > self.seen), key=lambda r: r["id"])

        wait_until(lambda: len(fetch()) >= expected, f"{expected} audit records", timeout_s=30)
        records = fetch()
        assert len(records) == expected, [(r["event"], r["detail"]) for r in records]
        self.seen = records[-1]["id"]
        return records


@contextlib.contextmanager
def running(settings: Settings, archive: Archive) -> Iterator[Running]:
    dimse = DimseServer(settings, archive)
    dimse.start()
    http = HttpServer(create_app(settings, archive), "127.0.0.1", settings.http.port)
    http.start()
    try:
        yield Running(settings, archive, dimse, http)
    finally:
        http.stop()
        dimse.stop()


def _study(folder: Path, count: int, patient_id: str) -> tuple[str, list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    files = [
        write_part10(ct_instance(study, series, seed=i, patient_id=patient_id), folder / f"{i}.dcm")
        for i in range(count)
    ]
    return study, files


def _find(hilum: Running, patient_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FINDSCU, "-S", "-aet", "FINDSCU", "-aec", hilum.settings.dimse.ae_title,
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={patient_id}",
         "-k", "StudyInstanceUID", "127.0.0.1", str(hilum.dimse.port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _hilum(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HILUM, *args], env=hilum_env(settings), capture_output=True, text=True, timeout=300
    )


def _brief(record: dict[str, Any]) -> tuple[Any, ...]:
    return (record["event"], record["action"], record["outcome"], record["instances"])


def test_each_action_leaves_its_records_and_verify_catches_a_deletion(tmp_path: Path) -> None:
    viewer_port = free_port()
    peers = [{"ae_title": "VIEWER", "host": "127.0.0.1", "port": viewer_port}]
    settings = make_settings(tmp_path, http={"allow_delete": True}, dimse={"peers": peers})
    archive = open_archive(settings, migrate=True)
    try:
        with (
            running(settings, archive) as hilum,
            storescp(tmp_path / "viewer", "VIEWER", viewer_port),
        ):
            _actions(hilum, tmp_path)
    finally:
        archive.close()
    _cli(settings, tmp_path)


def _actions(hilum: Running, tmp_path: Path) -> None:
    study, files = _study(tmp_path / "dimse", 3, "PAT-DIMSE")

    # DIMSE C-STORE, one association: the transfer begun (with its first instance) and ended.
    assert storescu(hilum.dimse, files).returncode == 0
    begun, ended = hilum.new_records(2)
    assert _brief(begun) == ("store-begun", "E", 0, 0)
    assert _brief(ended) == ("store", "C", 0, 3)
    for record in (begun, ended):
        assert (record["principal_kind"], record["principal_name"]) == ("ae", "STORESCU")
        # The association's peer, as server.dimse gives it (address:port).
        assert record["address"].startswith("127.0.0.1")
        assert record["transport"] == "dimse"
        assert (record["patient_id"], record["study_uids"]) == ("PAT-DIMSE", study)
    assert json.loads(ended["detail"]) == {"service": "C-STORE", "stored": 3}
    # The same again: held already (R).
    assert storescu(hilum.dimse, files).returncode == 0
    assert [_brief(r) for r in hilum.new_records(2)] == [
        ("store-begun", "E", 0, 0),
        ("store", "R", 0, 3),
    ]

    # DIMSE C-FIND (DCMTK findscu): one Query record, with what was asked.
    assert _find(hilum, "PAT-DIMSE").returncode == 0
    (query,) = hilum.new_records(1)
    assert _brief(query) == ("query", "E", 0, 0)
    assert (query["principal_name"], query["patient_id"]) == ("FINDSCU", "PAT-DIMSE")
    asked = json.loads(json.loads(query["detail"])["query"])
    assert asked["PatientID"] == "PAT-DIMSE"

    # DIMSE C-GET (pynetdicom): one retrieve record with the instances sent.
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    _responses, received = get_responses(hilum.dimse, identifier, {CTImageStorage: [IMPLICIT]})
    assert len(received) == 3
    (retrieve,) = hilum.new_records(1)
    assert _brief(retrieve) == ("retrieve", "R", 0, 3)
    assert (retrieve["principal_name"], retrieve["patient_id"]) == ("GETSCU", "PAT-DIMSE")

    # DIMSE C-MOVE to a known peer (DCMTK storescp): one retrieve record, naming it.
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", hilum.dimse.port, ae_title="HILUM")
    final = list(
        assoc.send_c_move(identifier, "VIEWER", StudyRootQueryRetrieveInformationModelMove)
    )
    assoc.release()
    assert final[-1][0].Status == 0x0000
    (moved,) = hilum.new_records(1)
    assert _brief(moved) == ("retrieve", "R", 0, 3)
    assert moved["principal_name"] == "MOVESCU"
    assert json.loads(moved["detail"]) == {"service": "C-MOVE", "move_destination": "VIEWER"}

    # DICOMweb: QIDO-RS, WADO-RS, STOW-RS, DELETE (dicomweb-client).
    client = hilum.dicomweb
    assert len(client.search_for_studies(search_filters={"PatientID": "PAT-DIMSE"})) == 1
    (qido,) = hilum.new_records(1)
    assert _brief(qido) == ("query", "E", 0, 0)
    assert (qido["transport"], qido["patient_id"], qido["address"]) == (
        "http",
        "PAT-DIMSE",
        "127.0.0.1",
    )
    assert len(client.retrieve_study(study)) == 3
    (wado,) = hilum.new_records(1)
    assert (wado["event"], wado["patient_id"], wado["study_uids"]) == (
        "retrieve",
        "PAT-DIMSE",
        study,
    )
    web_study = generate_uid()
    client.store_instances([ct_instance(web_study, generate_uid(), patient_id="PAT-WEB")])
    (stow,) = hilum.new_records(1)
    assert _brief(stow) == ("store", "C", 0, 1)
    assert (stow["patient_id"], stow["principal_kind"]) == ("PAT-WEB", "anonymous")

    # The UI: the worklist (a query) and the study page (a view).
    assert requests.get(f"{hilum.url}/?patient_id=PAT-WEB", timeout=30).status_code == 200
    (worklist,) = hilum.new_records(1)
    assert (worklist["event"], worklist["patient_id"]) == ("query", "PAT-WEB")
    assert requests.get(f"{hilum.url}/studies/{web_study}", timeout=30).status_code == 200
    (view,) = hilum.new_records(1)
    assert (view["event"], view["action"], view["patient_id"]) == ("view", "R", "PAT-WEB")

    client.delete_study(web_study)
    (deleted,) = hilum.new_records(1)
    assert _brief(deleted) == ("delete", "D", 0, 1)
    assert deleted["patient_id"] == "PAT-WEB"

    # A refusal is recorded with its reason.
    response = requests.get(f"{hilum.url}/dicomweb/studies/{generate_uid()}", timeout=30)
    assert response.status_code == 404
    (refused,) = hilum.new_records(1)
    assert (refused["event"], refused["outcome"]) == ("retrieve", 4)
    assert "no stored instance" in refused["reason"]

    # The privacy officer's question: every access to PAT-WEB (the search itself recorded).
    answer = requests.get(f"{hilum.url}/api/audit", params={"patient_id": "PAT-WEB"}, timeout=30)
    assert answer.status_code == 200
    events = [r["event"] for r in answer.json()["records"]]
    assert events == ["audit-read", "delete", "view", "query", "store"]
    (read,) = hilum.new_records(1)
    assert (read["event"], read["patient_id"]) == ("audit-read", "PAT-WEB")


def _cli(settings: Settings, tmp_path: Path) -> None:
    _study_uid, files = _study(tmp_path / "import", 2, "PAT-CLI")
    imported = _hilum(settings, "import", str(tmp_path / "import"))
    assert imported.returncode == 0, imported.stderr
    archive = open_archive(settings)
    try:
        records = search_records(archive.index, AuditSearch(patient_id="PAT-CLI"))
    finally:
        archive.close()
    assert [_brief(r) for r in reversed(records)] == [
        ("store-begun", "E", 0, 0),
        ("import", "C", 0, 2),
    ]
    assert all(r["transport"] == "cli" and r["principal_name"].startswith("os:") for r in records)

    verified = _hilum(settings, "audit", "verify")
    assert verified.returncode == 0, verified.stderr
    assert "audit trail intact" in verified.stdout

    # Behind Hilum's back: the trigger dropped, one record deleted.
    index = settings.server.data_dir / "index.sqlite"
    engine = create_engine(f"sqlite:///{index}")
    with engine.begin() as connection:
        connection.execute(text("DROP TRIGGER audit_record_no_delete"))
        connection.execute(text("DELETE FROM audit_record WHERE id = 5"))
    engine.dispose()
    broken = _hilum(settings, "audit", "verify")
    assert broken.returncode == 1
    assert "record 6 follows a gap: record 5 missing" in broken.stderr


def test_with_the_audit_trail_unwritable_nothing_is_served(tmp_path: Path) -> None:
    """INSERT on audit_record revoked from Hilum's database role: every query, retrieve and
    store is refused with the reason (0xA700 / 503), nothing answered unaudited."""
    role = f"hilum_noaudit_{uuid.uuid4().hex[:8]}"
    with postgres_database() as url:
        settings = make_settings(tmp_path, database_url=url)
        owner = open_archive(settings, migrate=True)
        study, files = _study(tmp_path / "seed", 1, "PAT-PG")
        from storage.ingest import ingest_file

        ingest_file(owner, files[0])
        with owner.index.engine.begin() as connection:
            connection.execute(text(f"CREATE ROLE {role} LOGIN"))
            connection.execute(text(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}"))
            connection.execute(text(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"))
            connection.execute(text(f"REVOKE INSERT ON audit_record FROM {role}"))
        as_role = make_url(url).set(username=role).render_as_string(hide_password=False)
        limited_settings = settings.model_copy(
            update={"storage": settings.storage.model_copy(update={"database_url": as_role})}
        )
        limited = open_archive(limited_settings)
        try:
            with running(limited_settings, limited) as hilum:
                ae = AE(ae_title="FINDSCU")
                ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
                assoc = ae.associate("127.0.0.1", hilum.dimse.port, ae_title="HILUM")
                identifier = Dataset()
                identifier.QueryRetrieveLevel = "STUDY"
                identifier.StudyInstanceUID = ""
                ((status, matched),) = list(
                    assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
                )
                assoc.release()
                assert (status.Status, matched) == (0xA700, None)
                assert "audit trail cannot be written" in status.ErrorComment

                qido = requests.get(f"{hilum.url}/dicomweb/studies", timeout=30)
                assert qido.status_code == 503
                assert "audit trail cannot be written" in qido.json()["error"]
                wado = requests.get(f"{hilum.url}/dicomweb/studies/{study}", timeout=30)
                assert wado.status_code == 503
                page = requests.get(f"{hilum.url}/studies/{study}", timeout=30)
                assert page.status_code == 503
                assert "PAT-PG" not in page.text

                _other, more = _study(tmp_path / "more", 1, "PAT-PG2")
                store = associate(hilum.dimse)
                stored_status = store.send_c_store(more[0])
                store.release()
                assert stored_status.Status == 0xA700
                assert "audit trail cannot be written" in stored_status.ErrorComment
            with owner.index.read() as session:
                stored = session.execute(text("SELECT count(*) FROM instance")).scalar()
            assert stored == 1  # the refused C-STORE left nothing
        finally:
            limited.close()
            with owner.index.engine.begin() as connection:
                connection.execute(text(f"DROP OWNED BY {role}"))
                connection.execute(text(f"DROP ROLE {role}"))
            owner.close()
