"""Group commit (storage/group_commit.py): concurrent callers share index transactions, each
gets its own outcome, and nothing is answered before its commit."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from storage.archive import Archive
from storage.errors import InvalidInstance
from storage.group_commit import GroupCommit
from storage.index.models import Instance
from storage.ingest import IngestOutcome, IngestResult, Received
from tests.factories import ct_instance, write_part10

CALLERS, FILES_EACH = 6, 4


class _SlowBlobStore:
    """The real blob store, slow to write (a busy disk): callers pile up behind a group."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self._inner, self._delay_s = inner, delay_s

    def put_all(self, blobs: list) -> list:
        time.sleep(self._delay_s)
        return self._inner.put_all(blobs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _stored_uids(archive: Archive) -> set[str]:
    with archive.index.read() as session:
        return set(session.execute(select(Instance.sop_instance_uid)).scalars())


def _in_parallel(group: GroupCommit, work: list[list[Path]]) -> list[list[Any]]:
    """Each list of files ingested one by one in its own thread, all threads at once."""
    outcomes: list[list[Any]] = [[] for _ in work]
    start = threading.Barrier(len(work))

    def run(n: int) -> None:
        start.wait()
        for path in work[n]:
            try:
                outcomes[n].append(group.ingest(Received(path)))
            except Exception as error:  # noqa: BLE001 (returned to the test)
                outcomes[n].append(error)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes


def test_concurrent_callers_share_transactions(archive: Archive, tmp_path: Path) -> None:
    slow = dataclasses.replace(archive, blobs=_SlowBlobStore(archive.blobs, 0.05))
    group = GroupCommit(slow)
    study, series = generate_uid(), generate_uid()
    work, expected = [], []
    for caller in range(CALLERS):
        files = []
        for n in range(FILES_EACH):
            ds = ct_instance(study, series, seed=caller * 100 + n)
            files.append(write_part10(ds, tmp_path / f"{caller}-{n}.dcm"))
            expected.append(ds.SOPInstanceUID)
        work.append(files)
    outcomes = _in_parallel(group, work)
    for files, results in zip(work, outcomes, strict=True):
        assert len(results) == len(files)
        assert all(isinstance(r, IngestResult) for r in results), results
        assert all(r.outcome == IngestOutcome.STORED for r in results)
    assert [r.sop_instance_uid for results in outcomes for r in results] == expected
    assert _stored_uids(archive) == set(expected)
    assert group.files == CALLERS * FILES_EACH
    # Callers arriving while a group commits wait and share the next one.
    assert group.groups < group.files


def test_a_refused_file_does_not_hold_back_its_group(archive: Archive, tmp_path: Path) -> None:
    slow = dataclasses.replace(archive, blobs=_SlowBlobStore(archive.blobs, 0.05))
    group = GroupCommit(slow)
    good = [ct_instance(seed=n) for n in range(3)]
    paths = [[write_part10(ds, tmp_path / f"{n}.dcm")] for n, ds in enumerate(good)]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not DICOM at all")
    paths.append([broken])
    # The same instance from two callers at once: stored once, the other a duplicate.
    twice = write_part10(ct_instance(seed=99), tmp_path / "twice.dcm")
    paths += [[twice], [twice]]
    outcomes = [results[0] for results in _in_parallel(group, paths)]
    assert [r.outcome for r in outcomes[:3]] == [IngestOutcome.STORED] * 3
    assert isinstance(outcomes[3], InvalidInstance)
    assert sorted(r.outcome.value for r in outcomes[4:]) == ["duplicate", "stored"]
    assert len(_stored_uids(archive)) == 4


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_a_caller_alone_is_stored_at_once(archive: Archive, tmp_path: Path) -> None:
    group = GroupCommit(archive)
    ds = ct_instance()
    result = group.ingest(Received(write_part10(ds, tmp_path / "a.dcm")))
    assert result.outcome == IngestOutcome.STORED and _stored_uids(archive) == {ds.SOPInstanceUID}
    assert (group.files, group.groups) == (1, 1)
