"""Prebuilt Core statements executed on the driver's own cursor, for the few that run for every
received file (``storage/ingest.py``, on SQLite).

SQLAlchemy's execution of a prebuilt statement (cache look-up, execution context, result
object) costs 20-40 µs of CPU; ``sqlite3``'s execution of the same SQL a few. A
:class:`DriverStatement` is the statement compiled once for the dialect, run on a cursor of the
connection that holds the caller's transaction, with each value bound through its column type's
own bind processor (a ``DateTime``, a ``JSON`` document), so the rows written are those
SQLAlchemy writes; a driver error is raised as SQLAlchemy's exception for it
(``IntegrityError``, ``OperationalError``, ...), so callers see what they saw before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from sqlalchemy import exc
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


class DriverStatement:
    """``statement`` compiled for ``dialect``, whose paramstyle must be positional (SQLite's)."""

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        if compiled.positiontup is None:
            raise ValueError(f"{dialect.name}: a positional paramstyle is needed")
        self.sql = compiled.string
        self.names = tuple(compiled.positiontup)
        self.processors: tuple[Callable[[Any], Any] | None, ...] = tuple(
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in self.names
        )
        self._error: type[Exception] = dialect.loaded_dbapi.Error

    def execute(self, cursor: Any, values: Mapping[str, Any]) -> Any:
        """Run it on ``cursor`` with ``values`` (by bind name); the cursor, to fetch from."""
        parameters = tuple(
            value if process is None else process(value)
            for process, value in zip(
                self.processors, [values[name] for name in self.names], strict=True
            )
        )
        try:
            return cursor.execute(self.sql, parameters)
        except self._error as error:
            raise exc.DBAPIError.instance(self.sql, parameters, error, self._error) from error
