"""Engine set-up for SQLite and PostgreSQL, transactions, and migrations."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Connection,
    CursorResult,
    Engine,
    Executable,
    create_engine,
    event,
    exc,
    text,
)
from sqlalchemy.orm import Session, sessionmaker

from storage.errors import StorageUnavailable
from storage.index.driver import DriverStatement

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def create_index_engine(
    database_url: str,
    *,
    pool_size: int = 32,
    flush_each_commit: bool = True,
    ping_on_checkout: bool = True,
) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql+psycopg://...``.

    ``flush_each_commit=False`` (on PostgreSQL the audit trail's own engine for the records of
    reads, ``[audit] fsync_reads``; on SQLite the trail sets it per record, ``storage.audit``):
    a commit is made durable by the next flush instead of waiting for its own (SQLite
    ``synchronous=NORMAL`` in WAL mode, PostgreSQL ``synchronous_commit=off``). It survives a
    crash of Hilum, and the database stays consistent through an OS crash or power loss, which
    may lose the last commits (SQLite: until the next fsync; PostgreSQL: under a second).

    ``ping_on_checkout=False``: a PostgreSQL connection taken from the pool is not pinged
    first (a round trip saved), for a caller that replaces a broken one itself (the audit
    trail's)."""
    if database_url.startswith("sqlite"):
        path = database_url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # LIFO: a thread's next transaction takes the connection its last one returned. In
        # WAL mode a read transaction keeps its connection's page cache only when no other
        # connection committed since that connection's last transaction; the audit trail
        # commits a read's record on this pool (``storage.audit``), so the read that follows
        # takes the connection that committed it, its cache still valid.
        engine = create_engine(
            database_url,
            pool_size=pool_size,
            max_overflow=8,
            pool_use_lifo=True,
            connect_args={"timeout": 30},
        )
        _configure_sqlite(engine, "FULL" if flush_each_commit else "NORMAL")
        return engine
    if database_url.startswith("postgresql"):
        return create_engine(
            database_url,
            pool_size=pool_size,
            max_overflow=8,
            pool_pre_ping=ping_on_checkout,
            pool_timeout=10,
            connect_args={
                "connect_timeout": 5,
                **({} if flush_each_commit else {"options": "-c synchronous_commit=off"}),
            },
        )
    raise ValueError(
        f"unsupported database_url {database_url!r} (use sqlite:/// or postgresql+psycopg://)"
    )


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's own is deferred and unconfigurable).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: an instance acknowledged to a modality survives a power loss.
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    begin = {
        immediate: DriverStatement(
            text("BEGIN IMMEDIATE" if immediate else "BEGIN"), engine.dialect
        )
        for immediate in (True, False)
    }

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A write transaction takes the write lock up front; a deferred one that later writes
        # would fail with SQLITE_BUSY_SNAPSHOT instead of waiting for the other writer. On the
        # driver's cursor (storage/index/driver.py): SQLAlchemy's execution of the BEGIN cost
        # more than the BEGIN, and every ingest group begins two transactions.
        immediate = conn.get_execution_options().get("hilum_write", False)
        with contextlib.closing(conn.connection.cursor()) as cursor:
            begin[bool(immediate)].execute(cursor, {})


class Index:
    """The index database: sessions for reading and for writing."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._write_engine = engine.execution_options(hilum_write=True)
        # PostgreSQL: a read on its own needs no transaction, whose BEGIN and ROLLBACK would
        # cost two round trips more than the statement (psycopg's autocommit is the client's
        # flag: setting it sends nothing).
        self._read_engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT")
            if engine.dialect.name == "postgresql"
            else engine
        )
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(self._write_engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with database_errors(), self._read() as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with database_errors(), self._write.begin() as session:
            yield session

    @contextlib.contextmanager
    def read_connection(self, *, autocommit: bool = False) -> Iterator[Connection]:
        """As :meth:`read`, on a Core connection: no ORM session (its set-up and teardown
        cost more than a prebuilt statement), for callers that execute statements only.
        ``autocommit``: on PostgreSQL each statement its own transaction, for a read of one
        plain statement (not a streamed one: a server-side cursor needs a transaction)."""
        engine = self._read_engine if autocommit else self.engine
        with database_errors(), engine.connect() as connection:
            yield connection

    @contextlib.contextmanager
    def write_connection(self) -> Iterator[Connection]:
        """As :meth:`write`, on a Core connection: one transaction, committed when the block
        ends, rolled back if it raises (the ingest of received files, per group)."""
        with database_errors(), self._write_engine.begin() as connection:
            yield connection

    @contextlib.contextmanager
    def alone(self, key: int) -> Iterator[bool]:
        """Whether this process may run the periodic task named by ``key`` now: on PostgreSQL
        a session advisory lock taken without waiting (False: another process holds it; the
        caller skips its turn), released when the block ends; on SQLite always True (one
        process writes)."""
        if self.dialect != "postgresql":
            yield True
            return
        with database_errors(), self.engine.connect() as connection:
            held = bool(
                connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
            )
            connection.commit()
            try:
                yield held
            finally:
                if held:
                    connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    connection.commit()

    def dispose(self) -> None:
        self.engine.dispose()


def affected_rows(session: Session, statement: Executable) -> int:
    """Run an UPDATE or DELETE in ``session``; how many rows it matched.

    ``Session.execute`` is annotated as returning a plain ``Result``; for these statements it
    is a ``CursorResult``, the one that knows the row count."""
    result = session.execute(statement)
    assert isinstance(result, CursorResult)
    return result.rowcount


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Turn a lost or unusable database into :class:`StorageUnavailable`."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as error:
        raise StorageUnavailable(f"index database unavailable: {error.orig or error}") from error
    except exc.DBAPIError as error:
        if error.connection_invalidated:
            raise StorageUnavailable(f"index database connection lost: {error.orig}") from error
        raise


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def require_current_schema(engine: Engine) -> None:
    """Refuse to serve an index that ``hilum db upgrade`` has not brought up to date."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    with database_errors(), engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current != head:
        raise StorageUnavailable(
            f"the index database is at schema {current or 'none'}, Hilum needs {head}: "
            "run `hilum db upgrade` first"
        )


def upgrade_database(engine: Engine) -> None:
    """Run the Alembic migrations up to the newest revision (idempotent)."""
    config = _alembic_config()
    with database_errors(), engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
