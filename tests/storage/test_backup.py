"""`hilum backup` and `hilum restore` of the embedded default (SQLite + files), as an
administrator runs them: back up, wipe, restore, verify, and the same QIDO-RS answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient

from config import Settings
from storage.archive import open_archive
from storage.backup import BackupError, sqlite_path
from tests.server.dicomweb.conftest import serve
from tests.server.test_cli import _hilum, _series

pytestmark = pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)


def _answers(settings: Settings) -> list[str]:
    """The QIDO-RS answers for every study and every instance, over HTTP, as a viewer sees
    them (the Retrieve URL left out: it names the server's port, new for each call)."""
    archive = open_archive(settings)
    server = serve(settings, archive)
    try:
        client = DICOMwebClient(f"http://127.0.0.1:{server.port}/dicomweb")
        answers = client.search_for_studies() + client.search_for_instances()
    finally:
        server.stop()
        archive.close()
    for answer in answers:
        answer.pop("00081190", None)
    return sorted(json.dumps(answer, sort_keys=True) for answer in answers)


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
