"""Races made deterministic through the archive's own parts: an index whose write
transactions, once ended, hand over to the test (there a concurrent sender acts)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from storage.index.database import Index


class IndexThenHook:
    """The real index; ``after_write`` runs each time a write transaction has ended
    (committed or rolled back), before its caller goes on."""

    def __init__(self, inner: Index, after_write: Callable[[], None]) -> None:
        self._inner, self._after_write = inner, after_write

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        with self._inner.write() as session:
            yield session
        self._after_write()

    @contextlib.contextmanager
    def write_connection(self) -> Iterator[Connection]:
        with self._inner.write_connection() as connection:
            yield connection
        self._after_write()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)
