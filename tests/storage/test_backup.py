"""`hilum backup` and `hilum restore` of the embedded default (SQLite + files), as an
administrator runs them: back up, wipe, restore, verify, and the same query answers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from config import Settings
from storage.archive import open_archive
from storage.backup import BackupError, sqlite_path
from storage.query import Query, QueryLevel, search
from tests.server.test_cli import _hilum, _series

pytestmark = pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)


def _answers(settings: Settings) -> list[dict]:
    archive = open_archive(settings)
    try:
        studies = list(search(archive, Query(QueryLevel.STUDY, {"StudyInstanceUID": ""})))
        instances = list(search(archive, Query(QueryLevel.IMAGE, {"SOPInstanceUID": ""})))
    finally:
        archive.close()
    return sorted(map(repr, studies + instances))  # type: ignore[arg-type]


def test_backup_wipe_restore_verify_gives_the_same_answers(
    settings: Settings, tmp_path: Path
) -> None:
    for n in range(2):
        _series(tmp_path / "incoming" / str(n), 3)
    assert _hilum(settings, "import", str(tmp_path / "incoming")).returncode == 0
    before = _answers(settings)
    assert len(before) == 2 + 6

    backup = tmp_path / "backup"
    made = _hilum(settings, "backup", str(backup))
    assert made.returncode == 0, made.stderr
    assert "the index and 6 instances" in made.stdout and "every SHA-256 checked" in made.stdout
    assert len(list((backup / "blobs").rglob("*.dcm"))) == 6

    shutil.rmtree(settings.server.data_dir)  # the disk is lost
    restored = _hilum(settings, "restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    assert "6 instances, 0 missing blobs, 0 checksum mismatches, 0 orphan blobs" in (
        restored.stdout
    )
    verified = _hilum(settings, "verify")
    assert verified.returncode == 0, verified.stdout
    assert _answers(settings) == before

    # Never over an archive, never into a used folder.
    again = _hilum(settings, "restore", str(backup))
    assert again.returncode == 3 and "restore into an empty data_dir" in again.stderr
    into_used = _hilum(settings, "backup", str(backup))
    assert into_used.returncode == 3 and "is not empty" in into_used.stderr


def test_backup_refuses_to_copy_a_damaged_blob(settings: Settings, tmp_path: Path) -> None:
    _series(tmp_path / "incoming", 2)
    assert _hilum(settings, "import", str(tmp_path / "incoming")).returncode == 0
    blob = sorted((settings.server.data_dir / "blobs").rglob("*.dcm"))[0]
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x01")  # bit rot

    result = _hilum(settings, "backup", str(tmp_path / "backup"))

    assert result.returncode == 3
    assert "does not match the SHA-256 the index recorded" in result.stderr


def test_a_postgresql_index_is_left_to_pg_dump(settings: Settings) -> None:
    with pytest.raises(BackupError, match="pg_dump"):
        sqlite_path("postgresql+psycopg://hilum:secret@db/hilum")
    assert sqlite_path(settings.database_url) == settings.server.data_dir.resolve() / (
        "index.sqlite"
    )
