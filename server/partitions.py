"""Which partition an HTTP request works in, and the archive it sees.

The URL root selects the partition: ``/dicomweb``, ``/wado``, ``/api`` and the UI pages at ``/``
are the ``default`` partition; the same routes under ``/partitions/{name}`` (e.g.
``/partitions/{name}/dicomweb``) are partition ``name``. Every family of routes is registered
at both roots (``PARTITION_ROOT`` is the second), and the app's one ``before_request`` hook
(``server.app``) calls :func:`enter_partition` with the ``partition`` URL value: the one place
where the partition is chosen and where a principal bound to other partitions gets a 404.

Views never hold an archive: :func:`request_archive` is the app's archive scoped to the
request's partition, so no query, retrieve, store or delete can forget it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from flask import current_app
from werkzeug.exceptions import NotFound

from server.context import Principal, RequestContext, http_context
from storage.archive import Archive
from storage.index.database import Index
from storage.index.models import DEFAULT_PARTITION
from storage.partitions import partition_exists

# The URL prefix of a partition's routes; the view never sees the ``partition`` value.
PARTITION_ROOT = "/partitions/<partition>"


def partition_prefix(partition: str) -> str:
    """What goes before ``/dicomweb``, ``/api`` or a page's path for ``partition``."""
    return "" if partition == DEFAULT_PARTITION else f"/partitions/{partition}"


def request_root() -> str:
    """The current request's partition root: ``""`` (default) or ``/partitions/{name}``."""
    return partition_prefix(http_context().partition)


def may_enter(principal: Principal, partition: str, exists: Callable[[str], bool]) -> bool:
    """The decision: the partition exists and the principal may see it (a principal bound to
    partitions sees only those; ``Principal.partitions`` None: every one). ``exists`` is asked
    only for a partition the principal may see, and never for ``default``."""
    if not principal.may_see(partition):
        return False
    return partition == DEFAULT_PARTITION or exists(partition)


def enter_partition(context: RequestContext, requested: str | None) -> RequestContext:
    """The request's context in the partition its URL names (``requested``; None: the URL has
    no partition root, i.e. ``default``); 404 when it does not exist or the principal may not
    see it, the same 404 for both, so that nobody learns another tenant's partition names."""
    partition = DEFAULT_PARTITION if requested is None else requested
    if not may_enter(context.principal, partition, _exists):
        raise _refused(partition)
    return replace(context, partition=partition)


class KnownPartitions:
    """Which partitions exist, each found one remembered for ``ttl_s`` seconds: a partition's
    DICOMweb root serves hundreds of frame requests a minute, and a partition is created far
    more rarely than that (one not found is looked up again at the next request, so a new
    partition answers at once)."""

    def __init__(
        self, index: Index, ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.index, self.ttl_s, self.clock = index, ttl_s, clock
        self._found: dict[str, float] = {}  # name -> when it was last found

    def __contains__(self, partition: object) -> bool:
        if not isinstance(partition, str):
            return False
        found = self._found.get(partition)
        now = self.clock()
        if found is not None and now - found < self.ttl_s:
            return True
        if not partition_exists(self.index, partition):
            self._found.pop(partition, None)
            return False
        self._found[partition] = now
        return True


def _exists(partition: str) -> bool:
    known: KnownPartitions = current_app.extensions["hilum.partitions"]
    return partition in known


def _refused(partition: str) -> NotFound:
    return NotFound(f"no partition {partition[:64]!r} here")


def check_visible() -> RequestContext:
    """The request's context, once more checked against its principal (which an
    authentication hook may have set after :func:`enter_partition` ran): 404 if the principal
    may not see the partition. :func:`request_archive` and every UI page call it."""
    context = http_context()
    if not context.principal.may_see(context.partition):
        raise _refused(context.partition)
    return context


def request_archive() -> Archive:
    """The archive the current request sees: the app's, scoped to the request's partition,
    so no view can read or write another tenant's data."""
    return _app_archive().scoped(check_visible().partition)


def _app_archive() -> Archive:
    archive: Archive = current_app.extensions["hilum.archive"]
    return archive
