"""storage/index/driver.py: a Core statement run on the driver's cursor writes what
SQLAlchemy writes and fails as SQLAlchemy fails."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    Insert,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    exc,
    insert,
    select,
    text,
)
from sqlalchemy.dialects import postgresql

from storage.index.driver import DriverStatement

_METADATA = MetaData()
_ROWS = Table(
    "rows",
    _METADATA,
    Column("id", Integer, primary_key=True),
    Column("name", String(16), unique=True),
    Column("at", DateTime(timezone=True)),
    Column("document", JSON, nullable=True),
)
_VALUES = [
    {
        "id": 1,
        "name": "a",
        "at": datetime(2026, 12, 4, 20, 1, 2, 345678, UTC),
        "document": {"x": [1]},
    },
    {"id": 2, "name": "b", "at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "document": None},
]


def _insert() -> Insert:
    return insert(_ROWS).values({c.key: bindparam(c.key, type_=c.type) for c in _ROWS.c})


def _stored(engine: Engine) -> list[tuple[object, ...]]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text("SELECT * FROM rows ORDER BY id"))]


def test_rows_written_on_the_driver_cursor_are_those_sqlalchemy_writes() -> None:
    through_sqlalchemy, through_driver = create_engine("sqlite://"), create_engine("sqlite://")
    for engine in (through_sqlalchemy, through_driver):
        _METADATA.create_all(engine)
    with through_sqlalchemy.begin() as connection:
        connection.execute(_insert(), _VALUES)
    statement = DriverStatement(_insert(), through_driver.dialect)
    with through_driver.begin() as connection:
        cursor = connection.connection.cursor()
        for values in _VALUES:
            statement.execute(cursor, values)
        cursor.close()

    assert _stored(through_driver) == _stored(through_sqlalchemy)
    # The DateTime and JSON columns as SQLAlchemy reads them back.
    with through_driver.connect() as connection:
        rows = connection.execute(select(_ROWS).order_by(_ROWS.c.id)).all()
    assert [row.document for row in rows] == [{"x": [1]}, None]
    assert rows[0].at.replace(tzinfo=UTC) == _VALUES[0]["at"]


def test_a_driver_error_is_raised_as_sqlalchemys() -> None:
    engine = create_engine("sqlite://")
    _METADATA.create_all(engine)
    statement = DriverStatement(_insert(), engine.dialect)
    with engine.begin() as connection:
        cursor = connection.connection.cursor()
        statement.execute(cursor, _VALUES[0])
        with pytest.raises(exc.IntegrityError):
            statement.execute(cursor, {**_VALUES[1], "name": "a"})  # unique name again
        cursor.close()


def test_a_named_paramstyle_is_refused() -> None:
    with pytest.raises(ValueError, match="positional"):
        DriverStatement(_insert(), postgresql.psycopg.dialect())
