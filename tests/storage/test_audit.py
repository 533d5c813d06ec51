"""The audit trail's chain (storage/audit.py): appends, append-only triggers, verification after
a record is altered or removed behind Hilum's back, concurrent writers, the JSON lines."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, exc, text

from config import Settings
from storage.archive import Archive, open_archive
from storage.audit import (
    CHAIN_LOCK,
    GENESIS,
    Actor,
    ActorPrincipal,
    AuditEntry,
    AuditEvent,
    AuditSearch,
    AuditTrail,
    AuditUnavailable,
    Outcome,
    login_entry,
    query_entry,
    search_records,
    security_change_entry,
    verify_chain,
)
from storage.index.database import Index, create_index_engine
from storage.ingest import ingest_file
from storage.query import Query, QueryLevel, search
from tests.conftest import make_settings, postgres_database
from tests.factories import ct_instance, write_part10
from tests.waiting import wait_until

ALICE = Actor(ActorPrincipal("user", "alice", "tok-1"), "10.0.0.7", "http", request_id="r1")


@pytest.fixture
def sqlite_archive(tmp_path: Path) -> Iterator[Archive]:
    archive = open_archive(make_settings(tmp_path), migrate=True)
    yield archive
    archive.close()


def _entries(n: int) -> list[AuditEntry]:
    return [
        AuditEntry(AuditEvent.QUERY, patient_id=f"P{i}", detail={"service": "test", "n": i})
        for i in range(n)
    ]


def _tamper(archive: Archive, statement: str) -> None:
    """Change the table behind Hilum's back, as someone with the database's owner rights can:
    the append-only trigger set aside for the one statement."""
    with archive.index.engine.begin() as connection:
        if archive.index.dialect == "postgresql":
            connection.execute(text("ALTER TABLE audit_record DISABLE TRIGGER USER"))
            connection.execute(text(statement))
            connection.execute(text("ALTER TABLE audit_record ENABLE TRIGGER USER"))
        else:
            connection.execute(text("DROP TRIGGER audit_record_no_update"))
            connection.execute(text("DROP TRIGGER audit_record_no_delete"))
            connection.execute(text(statement))


def test_records_chain_each_to_the_one_before(sqlite_archive: Archive, tmp_path: Path) -> None:
    trail = sqlite_archive.audit
    assert trail is not None
    trail.record(ALICE, *_entries(3))
    trail.record(ALICE, login_entry("alice", success=False, reason="wrong password"))
    records = sorted(search_records(trail.index, AuditSearch()), key=lambda r: r["id"])
    assert [r["id"] for r in records] == [1, 2, 3, 4]
    assert records[0]["previous_hash"] == GENESIS
    assert all(b["previous_hash"] == a["hash"] for a, b in zip(records, records[1:], strict=False))
    assert records[3]["outcome"] == Outcome.MINOR_FAILURE
    assert records[3]["reason"] == "wrong password"
    report = verify_chain(trail.index)
    assert (report.records, report.first_id, report.last_id, report.fault) == (4, 1, 4, None)

    # The JSON lines copy: one PS3.15 A.5 message per record.
    lines = (tmp_path / "hilum-data" / "audit.jsonl").read_text().splitlines()
    messages = [json.loads(line) for line in lines]
    assert [m["Hilum"]["id"] for m in messages] == [1, 2, 3, 4]
    query = messages[0]
    assert query["EventIdentification"]["EventID"]["csd-code"] == "110112"
    assert query["EventIdentification"]["EventActionCode"] == "E"
    assert query["ActiveParticipant"][0] == {
        "UserID": "alice",
        "AlternativeUserID": "token:tok-1",
        "UserIsRequestor": True,
        "UserTypeCode": "user",
        "NetworkAccessPointTypeCode": "2",
        "NetworkAccessPointID": "10.0.0.7",
    }
    patient = query["ParticipantObjectIdentification"][0]
    assert (patient["ParticipantObjectTypeCode"], patient["ParticipantObjectTypeCodeRole"]) == (
        1,
        1,
    )
    assert patient["ParticipantObjectID"] == "P0"
    login = messages[3]["EventIdentification"]
    assert login["EventID"]["csd-code"] == "110114"
    assert login["EventTypeCode"][0]["csd-code"] == "110122"
    assert login["EventOutcomeIndicator"] == 4


def test_no_statement_updates_or_deletes_a_record(sqlite_archive: Archive) -> None:
    assert sqlite_archive.audit is not None
    sqlite_archive.audit.record(ALICE, *_entries(1))
    for statement in ("UPDATE audit_record SET patient_id = 'X'", "DELETE FROM audit_record"):
        with (
            pytest.raises(exc.DBAPIError, match="append-only"),
            sqlite_archive.index.engine.begin() as connection,
        ):
            connection.execute(text(statement))
    assert verify_chain(sqlite_archive.index).records == 1


def test_verify_names_the_first_altered_record(sqlite_archive: Archive) -> None:
    assert sqlite_archive.audit is not None
    sqlite_archive.audit.record(ALICE, *_entries(5))
    _tamper(sqlite_archive, "UPDATE audit_record SET patient_id = 'SOMEONE-ELSE' WHERE id = 3")
    report = verify_chain(sqlite_archive.index)
    assert report.fault is not None
    assert report.fault.record_id == 3
    assert "altered" in report.fault.reason
    assert report.records == 2


def test_verify_names_a_missing_record(sqlite_archive: Archive) -> None:
    assert sqlite_archive.audit is not None
    sqlite_archive.audit.record(ALICE, *_entries(5))
    _tamper(sqlite_archive, "DELETE FROM audit_record WHERE id = 2")
    fault = verify_chain(sqlite_archive.index).fault
    assert fault is not None
    assert (fault.record_id, fault.reason) == (3, "record 3 follows a gap: record 2 missing")


def test_a_record_rewritten_with_a_fresh_hash_breaks_the_next_link(
    sqlite_archive: Archive,
) -> None:
    """Whoever alters a record and recomputes its hash still breaks the next record's link."""
    assert sqlite_archive.audit is not None
    sqlite_archive.audit.record(ALICE, *_entries(3))
    (record,) = [r for r in search_records(sqlite_archive.index, AuditSearch()) if r["id"] == 2]
    from storage.audit import record_hash

    forged = {**record, "patient_id": "FORGED"}
    _tamper(
        sqlite_archive,
        f"UPDATE audit_record SET patient_id = 'FORGED', hash = '{record_hash(forged)}' "
        "WHERE id = 2",
    )
    fault = verify_chain(sqlite_archive.index).fault
    assert fault is not None and fault.record_id == 3
    assert "does not chain to record 2" in fault.reason


def test_search_filters_and_pages(sqlite_archive: Archive) -> None:
    trail = sqlite_archive.audit
    assert trail is not None
    study = generate_uid()
    bob = Actor(ActorPrincipal("ae", "CT_SCANNER"), "10.0.0.9", "dimse")
    trail.record(ALICE, AuditEntry(AuditEvent.VIEW, patient_id="P1", study_uids=(study,)))
    trail.record(bob, AuditEntry(AuditEvent.QUERY, patient_id="P2"))
    trail.record(bob, security_change_entry(AuditEvent.TOKEN_CHANGE, "tok-9", "revoked"))
    assert [r["id"] for r in search_records(trail.index, AuditSearch(patient_id="P1"))] == [1]
    assert [r["id"] for r in search_records(trail.index, AuditSearch(study=study))] == [1]
    assert [r["id"] for r in search_records(trail.index, AuditSearch(user="CT_SCANNER"))] == [3, 2]
    page = search_records(trail.index, AuditSearch(limit=2))
    assert [r["id"] for r in page] == [3, 2]
    assert [r["id"] for r in search_records(trail.index, AuditSearch(before=2))] == [1]


def test_ingest_records_stores_duplicates_and_refusals(
    sqlite_archive: Archive, tmp_path: Path
) -> None:
    ds = ct_instance()
    path = write_part10(ds, tmp_path / "a.dcm")
    ingest_file(sqlite_archive, path, requestor=ALICE)
    ingest_file(sqlite_archive, path, requestor=ALICE)  # the same again: R (held already)
    records = sorted(search_records(sqlite_archive.index, AuditSearch()), key=lambda r: r["id"])
    assert [(r["event"], r["action"], r["instances"]) for r in records] == [
        ("store", "C", 1),
        ("store", "R", 1),
    ]
    assert records[0]["patient_id"] == ds.PatientID
    assert records[0]["study_uids"] == ds.StudyInstanceUID
    assert records[0]["principal_name"] == "alice"


def test_a_store_whose_record_cannot_be_written_is_refused(tmp_path: Path) -> None:
    """The audit row rides in the store's own transaction: refused together."""
    with postgres_database() as url:
        settings = make_settings(tmp_path, database_url=url)
        archive = open_archive(settings, migrate=True)
        try:
            _revoke_audit_inserts(archive, settings)
            limited = open_archive(_as_role(settings, url))
            path = write_part10(ct_instance(), tmp_path / "a.dcm")
            from storage.audit import AuditUnavailable

            with pytest.raises(AuditUnavailable, match="permission denied"):
                ingest_file(limited, path, requestor=ALICE)
            limited.close()
            with archive.index.read() as session:
                assert session.execute(text("SELECT count(*) FROM instance")).scalar() == 0
        finally:
            _drop_role(archive)
            archive.close()


ROLE = f"hilum_audit_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide: one per run


def _revoke_audit_inserts(archive: Archive, settings: Settings) -> None:
    """A role that may do everything Hilum does but append to the audit trail: a real
    permission change on the real PostgreSQL."""
    with archive.index.engine.begin() as connection:
        connection.execute(text(f"DROP ROLE IF EXISTS {ROLE}"))
        connection.execute(text(f"CREATE ROLE {ROLE} LOGIN"))
        connection.execute(text(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {ROLE}"))
        connection.execute(text(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {ROLE}"))
        connection.execute(text(f"REVOKE INSERT ON audit_record FROM {ROLE}"))


def _as_role(settings: Settings, url: str) -> Settings:
    from sqlalchemy.engine import make_url

    as_role = make_url(url).set(username=ROLE).render_as_string(hide_password=False)
    storage = settings.storage.model_copy(update={"database_url": as_role})
    return settings.model_copy(update={"storage": storage})


def _drop_role(archive: Archive) -> None:
    engine = create_engine(archive.index.engine.url)
    with engine.begin() as connection:
        connection.execute(text(f"DROP OWNED BY {ROLE}"))
        connection.execute(text(f"DROP ROLE {ROLE}"))
    engine.dispose()


def test_concurrent_writers_on_postgresql_never_fork_the_chain(tmp_path: Path) -> None:
    """Two processes' worth of engines (separate pools) appending at once, reads' records and
    stores' together: one chain, every record, and the trigger and the chain check hold on
    PostgreSQL too."""
    with postgres_database() as url:
        settings = make_settings(tmp_path, database_url=url, audit={"json_lines": "off"})
        archives = [open_archive(settings, migrate=True), open_archive(settings)]
        try:

            def append(archive: Archive) -> None:
                assert archive.audit is not None
                for _ in range(20):
                    archive.audit.record(ALICE, *_entries(2))

            files = [write_part10(ct_instance(), tmp_path / f"{n}.dcm") for n in range(10)]

            def store(archive: Archive) -> None:
                # Stores append in their own transaction, under the chain lock, meanwhile.
                for path in files:
                    ingest_file(archive, path, requestor=ALICE)

            threads = [
                threading.Thread(target=append, args=(a,)) for a in archives for _ in range(3)
            ]
            threads.append(threading.Thread(target=store, args=(archives[1],)))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            report = verify_chain(archives[0].index)
            assert (report.records, report.fault) == (240 + 10, None)

            with (
                pytest.raises(exc.DBAPIError, match="append-only"),
                archives[0].index.engine.begin() as connection,
            ):
                connection.execute(text("DELETE FROM audit_record WHERE id = 5"))
            _tamper(archives[0], "UPDATE audit_record SET instances = 9 WHERE id = 7")
            fault = verify_chain(archives[0].index).fault
            assert fault is not None and fault.record_id == 7
        finally:
            for archive in archives:
                archive.close()


def test_export_hooks_record_one_message_per_patient(
    sqlite_archive: Archive, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hook points other parts call (export, de-identified copy): the patients looked up
    from the studies, one record (one A.5 message) per patient; JSON lines to stdout ("-")."""
    from storage.audit import AuditTrail, JsonLines, deidentified_copy_entry, export_entry

    first, second = ct_instance(patient_id="P-A"), ct_instance(patient_id="P-B")
    for n, ds in enumerate((first, second)):
        ingest_file(sqlite_archive, write_part10(ds, tmp_path / f"{n}.dcm"))
    assert sqlite_archive.audit is not None
    trail = AuditTrail(sqlite_archive.audit.index, JsonLines("-"))
    studies = [first.StudyInstanceUID, second.StudyInstanceUID]
    trail.record(ALICE, export_entry(studies, 2, "/mnt/export", deidentified=True))
    trail.record(ALICE, deidentified_copy_entry(first.StudyInstanceUID, 1, "research", "lung"))
    found = search_records(trail.index, AuditSearch(user="alice"))
    assert sorted((r["event"], r["patient_id"], r["study_uids"]) for r in found) == [
        ("deidentified-copy", "P-A", first.StudyInstanceUID),
        ("export", "P-A", first.StudyInstanceUID),
        ("export", "P-B", second.StudyInstanceUID),
    ]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [m["EventIdentification"]["EventID"]["csd-code"] for m in lines] == ["110106"] * 3
    assert verify_chain(trail.index).fault is None


def test_writers_of_several_processes_on_sqlite_chain_after_each_other(tmp_path: Path) -> None:
    """Each archive (a process's worth: its own engines) appends after the head it last saw
    when that is still the head, else after the head read from the table: alternating and
    concurrent writers leave one unbroken chain with every record. More writers than the
    trail's pool holds (on SQLite the index's: the trail keeps none between records)."""
    settings = make_settings(tmp_path, audit={"json_lines": "off"})
    archives = [open_archive(settings, migrate=True), open_archive(settings)]
    try:
        for n in range(6):  # alternating: each append finds the other's record at the head
            trail = archives[n % 2].audit
            assert trail is not None
            trail.record(ALICE, *_entries(1 + n % 3))

        def append(archive: Archive) -> None:
            assert archive.audit is not None
            for _ in range(5):
                archive.audit.record(ALICE, *_entries(2))

        threads = [threading.Thread(target=append, args=(a,)) for a in archives for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        report = verify_chain(archives[0].index)
        assert (report.records, report.fault) == (12 + 120, None)
        for archive in archives:
            assert archive.audit is not None
            assert len(search_records(archive.audit.index, AuditSearch(limit=500))) == 132
    finally:
        for archive in archives:
            archive.close()


def test_a_record_after_an_altered_head_is_still_caught(sqlite_archive: Archive) -> None:
    """The head an archive remembers is a hint checked against the table: a head altered
    behind Hilum's back is not chained to as if it were intact, and verify names it."""
    trail = sqlite_archive.audit
    assert trail is not None
    trail.record(ALICE, *_entries(3))
    # Its first digit changed: to 'f', to 'e' when it is one (else one run in 16 alters nothing).
    first = "CASE substr(hash, 1, 1) WHEN 'f' THEN 'e' ELSE 'f' END"
    _tamper(
        sqlite_archive, f"UPDATE audit_record SET hash = {first} || substr(hash, 2) WHERE id = 3"
    )
    trail.record(ALICE, *_entries(1))
    records = sorted(search_records(trail.index, AuditSearch()), key=lambda r: r["id"])
    assert [r["id"] for r in records] == [1, 2, 3, 4]
    assert records[3]["previous_hash"] == records[2]["hash"]  # the table's, not the memory's
    fault = verify_chain(trail.index).fault
    assert fault is not None and fault.record_id == 3


def test_a_connection_lost_in_the_pool_is_replaced_on_postgresql(tmp_path: Path) -> None:
    """The trail's pool does not ping: a connection the server closed while it sat in the
    pool is replaced once, and the record is written (not the operation refused)."""
    with postgres_database() as url:
        settings = make_settings(tmp_path, database_url=url, audit={"json_lines": "off"})
        archive = open_archive(settings, migrate=True)
        try:
            assert archive.audit is not None
            archive.audit.record(ALICE, *_entries(1))
            with archive.index.engine.begin() as connection:
                ended = connection.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalar()
            assert ended and ended >= 1  # the trail's pooled connection among them
            archive.audit.record(ALICE, *_entries(1))
            report = verify_chain(archive.index)
            assert (report.records, report.fault) == (2, None)
        finally:
            archive.close()


def _data_version(archive: Archive) -> tuple[int, int]:
    """The driver connection a read of ``archive`` gets next (its identity) and its PRAGMA
    data_version, which changes when another connection committed since its last read."""
    with archive.index.read_connection() as connection:
        version = connection.execute(text("PRAGMA data_version")).scalar_one()
        return id(connection.connection.driver_connection), int(version)


def test_a_search_keeps_its_page_cache_across_its_own_record(
    sqlite_archive: Archive, tmp_path: Path
) -> None:
    """SQLite in WAL mode: a read transaction drops its connection's page cache when another
    connection committed since. A search's record is committed on the search's own connection
    (and any read's record on the connection the next read takes): the reading connection's
    data_version stays, though a record was committed; a commit on another connection (a
    trail of its own engine, as before) changes it."""
    ingest_file(sqlite_archive, write_part10(ct_instance(patient_id="P-1"), tmp_path / "a.dcm"))
    query = Query(QueryLevel.STUDY, {"PatientID": "P-1", "StudyInstanceUID": ""})
    before = _data_version(sqlite_archive)
    found = list(
        search(
            sqlite_archive, query, (ALICE, query_entry("STUDY", query.matching, service="C-FIND"))
        )
    )
    assert len(found) == 1
    assert _data_version(sqlite_archive) == before
    sqlite_archive.record(ALICE, *_entries(1))
    assert _data_version(sqlite_archive) == before
    records = search_records(sqlite_archive.index, AuditSearch(user="alice"))
    assert [r["patient_id"] for r in records] == ["P0", "P-1"]

    other = AuditTrail(Index(create_index_engine(str(sqlite_archive.index.engine.url))))
    try:
        other.record(ALICE, *_entries(1))
    finally:
        other.close()
    connection, version = _data_version(sqlite_archive)
    assert (connection, version) != before and connection == before[0]
    assert verify_chain(sqlite_archive.index).records == 4  # the store's record too


def test_a_search_whose_record_cannot_be_written_searches_nothing(
    sqlite_archive: Archive, tmp_path: Path
) -> None:
    """The record written on the search's connection fails (a trigger refuses it): the search
    raises AuditUnavailable before any match, and leaves its connection as it found it (the
    next search, with its record, runs)."""
    ingest_file(sqlite_archive, write_part10(ct_instance(patient_id="P-1"), tmp_path / "a.dcm"))
    query = Query(QueryLevel.STUDY, {"PatientID": "P-1"})
    entry = query_entry("STUDY", query.matching, service="QIDO-RS")
    with sqlite_archive.index.engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TRIGGER audit_record_refused BEFORE INSERT ON audit_record "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )
        )
    rows = search(sqlite_archive, query, (ALICE, entry))
    with pytest.raises(AuditUnavailable, match="refused by the test"):
        next(rows)
    with sqlite_archive.index.engine.begin() as connection:
        connection.execute(text("DROP TRIGGER audit_record_refused"))
    assert len(list(search(sqlite_archive, query, (ALICE, entry)))) == 1
    report = verify_chain(sqlite_archive.index)
    assert (report.records, report.fault) == (2, None)  # the store's, the second search's


def _readers(
    trail: AuditTrail, actors: list[Actor], on_return: Callable[[Actor], None]
) -> tuple[list[threading.Thread], dict[str, BaseException]]:
    """One thread per actor recording one Query entry (as concurrent C-FINDs do); what each
    raised, by request id; ``on_return`` called in the thread once its record returned."""
    raised: dict[str, BaseException] = {}

    def read(actor: Actor) -> None:
        try:
            trail.record(actor, query_entry("STUDY", {"PatientID": "P1"}, service="C-FIND"))
        except AuditUnavailable as error:
            raised[actor.request_id] = error
            return
        on_return(actor)

    return [threading.Thread(target=read, args=(a,)) for a in actors], raised


def test_concurrent_reads_share_a_commit_and_each_returns_after_its_own(tmp_path: Path) -> None:
    """Group commit: readers that arrive while a record is being written wait, and the next
    leader writes all of theirs in one transaction (one recorded_at); each returns only once
    its own record is committed (seen from another connection), and the chain is unbroken."""
    settings = make_settings(tmp_path, audit={"json_lines": str(tmp_path / "audit.jsonl")})
    archive = open_archive(settings, migrate=True)
    trail = archive.audit
    assert trail is not None
    database = str(archive.index.engine.url.database)
    seen: dict[str, int] = {}

    def committed(actor: Actor) -> None:
        with contextlib.closing(sqlite3.connect(database)) as outside:
            (count,) = outside.execute(
                "SELECT count(*) FROM audit_record WHERE request_id = ?", (actor.request_id,)
            ).fetchone()
        seen[actor.request_id] = count

    actors = [replace(ALICE, request_id=f"reader-{n}") for n in range(6)]
    threads, raised = _readers(trail, actors, committed)
    # Another writer holds the database's write lock: the first leader waits in the database,
    # the other readers queue behind it in the trail.
    blocker = sqlite3.connect(database, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        for thread in threads:
            thread.start()
        wait_until(lambda: trail.in_flight() == 6, "six records handed to the trail")
        assert seen == {}  # none returned before its commit
        blocker.execute("COMMIT")
        for thread in threads:
            thread.join(timeout=120)
    finally:
        blocker.close()
    try:
        assert raised == {}
        assert seen == {actor.request_id: 1 for actor in actors}
        report = verify_chain(trail.index)
        assert (report.records, report.fault) == (6, None)
        records = search_records(trail.index, AuditSearch(user="alice"))
        # The first leader's transaction, then one for all that queued behind it (at most
        # two: six alone would be six).
        assert len({r["recorded_at"] for r in records}) <= 2
        lines = (tmp_path / "audit.jsonl").read_text().splitlines()
        assert sorted(json.loads(line)["Hilum"]["request_id"] for line in lines) == sorted(
            a.request_id for a in actors
        )
    finally:
        archive.close()


def test_concurrent_searches_share_a_commit_on_the_leaders_connection(tmp_path: Path) -> None:
    """Searches that lend their connection (C-FIND, QIDO-RS) while another writer holds the
    SQLite write lock: their records form groups as other records do, each written once by a
    leader on its own connection, and every search answers after its record."""
    settings = make_settings(tmp_path, audit={"json_lines": "off"})
    archive = open_archive(settings, migrate=True)
    try:
        ingest_file(archive, write_part10(ct_instance(patient_id="P-1"), tmp_path / "a.dcm"))
        query = Query(QueryLevel.STUDY, {"PatientID": "P-1"})
        trail = archive.audit
        assert trail is not None
        found: dict[str, int] = {}

        def read(actor: Actor) -> None:
            entry = query_entry("STUDY", query.matching, service="C-FIND")
            found[actor.request_id] = len(list(search(archive, query, (actor, entry))))

        actors = [replace(ALICE, request_id=f"search-{n}") for n in range(6)]
        threads = [threading.Thread(target=read, args=(actor,)) for actor in actors]
        blocker = sqlite3.connect(str(archive.index.engine.url.database), isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            for thread in threads:
                thread.start()
            wait_until(lambda: trail.in_flight() == 6, "six records handed to the trail")
            assert found == {}
            blocker.execute("COMMIT")
            for thread in threads:
                thread.join(timeout=120)
        finally:
            blocker.close()
        assert found == {actor.request_id: 1 for actor in actors}
        records = search_records(archive.index, AuditSearch(user="alice"))
        assert sorted(r["request_id"] for r in records) == sorted(a.request_id for a in actors)
        assert len({r["recorded_at"] for r in records}) <= 2
        report = verify_chain(archive.index)
        assert (report.records, report.fault) == (7, None)  # and the store's
    finally:
        archive.close()


def test_a_failed_record_in_a_group_fails_its_read_only(tmp_path: Path) -> None:
    """One reader's record that PostgreSQL refuses (a token id longer than its column) in a
    group with others: that reader's read is refused (AuditUnavailable), the others' records
    are committed, each once, and the chain is unbroken. Then a trail that may not insert at
    all refuses every concurrent read."""
    with postgres_database() as url:
        settings = make_settings(tmp_path, database_url=url, audit={"json_lines": "off"})
        archive = open_archive(settings, migrate=True)
        try:
            trail = archive.audit
            assert trail is not None
            trail.record(ALICE, *_entries(1))  # the head, cached
            bad = Actor(ActorPrincipal("user", "mallory", "t" * 200), request_id="reader-bad")
            actors = [replace(ALICE, request_id=f"reader-{n}") for n in range(4)]
            threads, raised = _readers(trail, [*actors, bad], lambda _actor: None)
            with archive.index.engine.connect() as blocker:
                # The chain's lock held by another session: the group forms behind it.
                blocker.execute(text("SELECT pg_advisory_lock(:key)"), {"key": CHAIN_LOCK})
                for thread in threads:
                    thread.start()
                wait_until(lambda: trail.in_flight() == 5, "five records handed to the trail")
                blocker.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": CHAIN_LOCK})
                blocker.commit()
            for thread in threads:
                thread.join(timeout=120)
            assert list(raised) == ["reader-bad"]
            assert isinstance(raised["reader-bad"], AuditUnavailable)
            assert "too long" in str(raised["reader-bad"])
            report = verify_chain(trail.index)
            assert (report.records, report.fault) == (5, None)
            found = search_records(trail.index, AuditSearch())
            assert sorted(r["request_id"] for r in found) == sorted(
                ["r1", *(a.request_id for a in actors)]
            )

            _revoke_audit_inserts(archive, settings)
            limited = open_archive(_as_role(settings, url))
            try:
                assert limited.audit is not None
                threads, raised = _readers(limited.audit, actors, lambda _actor: None)
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=120)
                assert sorted(raised) == sorted(a.request_id for a in actors)
                assert all("permission denied" in str(e) for e in raised.values())
            finally:
                limited.close()
            assert verify_chain(trail.index).records == 5
        finally:
            _drop_role(archive)
            archive.close()


# A record as main at bda8404 hashed it (generic canonical JSON): the hashes of rows already in
# a trail must still verify after the hash is computed field by field.
_OLD_ROW = {
    "id": 7,
    "recorded_at": "2026-12-04T20:00:00.123456Z",
    "event": "query",
    "action": "E",
    "outcome": 4,
    "reason": 'refused: "bad"\tkey\\x',
    "principal_kind": "user",
    "principal_name": "Zoë \u2028 O'Brien",
    "token_id": "tok-1",
    "address": "10.0.0.7",
    "transport": "http",
    "request_id": "r\ufffd1",
    "partition": "default",
    "patient_id": "P\x7f1",
    "study_uids": "1.2.3\\4.5.6",
    "instances": 2,
    "detail": '{"query":"{\\"PatientID\\":\\"P1\\"}","service":"QIDO-RS"}',
    "previous_hash": GENESIS,
}
_OLD_PLAIN_ROW = {
    **_OLD_ROW,
    "reason": "",
    "principal_name": "alice",
    "request_id": "r1",
    "patient_id": "P1",
    "study_uids": "1.2.3",
}


@pytest.mark.parametrize(
    ("row", "old_hash"),
    [
        (_OLD_ROW, "2dcc37519741f9aeea8009cc51a12bb5b64262e5e40c1b8addcb5cc8a15043b7"),
        (_OLD_PLAIN_ROW, "8da4e57e61a888691a95f70ff2cf9e15e10f2cf159bbb467e2879a10e14a2f64"),
    ],
)
def test_a_records_hash_is_the_one_earlier_versions_wrote(
    row: dict[str, object], old_hash: str
) -> None:
    """Texts needing escapes (quotes, backslashes, controls, separators) or none: the same
    canonical JSON as the generic encoder's, so the same hash as before."""
    from storage.audit import HASHED_FIELDS, canonical_json, record_hash

    assert record_hash(row) == old_hash
    body = canonical_json({name: row[name] for name in HASHED_FIELDS})
    assert hashlib.sha256((GENESIS + body).encode()).hexdigest() == old_hash


def test_each_json_line_is_its_audit_messages_json() -> None:
    """The JSON line written from fragments is the text of :func:`audit_message`'s message,
    for every event, with and without a reason, token, address, patient, studies, instances,
    detail, and with texts that need escapes."""
    from storage.audit import _LINE, _rows, audit_line, audit_message

    contexts = [
        Actor(ActorPrincipal("ae", "FINDSCU"), "127.0.0.1", "dimse", request_id="assoc-1"),
        Actor(ActorPrincipal("user", 'al"ice\\\n', "tok-1"), "", "http", request_id="r\x001"),
        Actor(),
    ]
    details: list[dict[str, object]] = [
        {},
        {"service": "C-STORE", "called_ae_title": "ARCHIVE", "stored": 3},
        {"query": '{"PatientID":"P\\\\1"}', "sop_class_uid": "1.2"},
        {"resource": "/studies", "x": "é\u2028\x7f"},
    ]
    checked = 0
    for event in AuditEvent:
        for detail in details:
            for studies, instances in (((), 0), (("1.2.3",), 4), (("1.2.3", "4.5"), 0)):
                for reason in ("", 'bad "x"'):
                    entry = AuditEntry(
                        event,
                        Outcome.MINOR_FAILURE if reason else Outcome.SUCCESS,
                        reason,
                        patient_id="P1" if instances else "",
                        study_uids=studies,
                        instances=instances,
                        detail=detail,
                    )
                    for context in contexts:
                        [row] = _rows(
                            [(context, entry, entry.patient_id or "", studies)], 7, GENESIS
                        )
                        for source in ("HILUM", 'A"E'):
                            expected = _LINE.encode(audit_message(row, source))
                            assert audit_line(row, source) == expected
                            checked += 1
    assert checked == len(AuditEvent) * 4 * 3 * 2 * 3 * 2
