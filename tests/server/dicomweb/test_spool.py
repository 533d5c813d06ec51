"""Local copies of stored blobs (server/dicomweb/spool.py): on disk they lie in
``<data_dir>/tmp``, never in the system's temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config import Settings
from server.dicomweb.spool import Spool
from storage.archive import Archive
from storage.blobs import instance_blob_key


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_a_copy_on_disk_lies_in_the_data_dir_tmp(
    backend: str, settings: Settings, archive: Archive, tmp_path: Path
) -> None:
    source = tmp_path / "blob.dcm"
    source.write_bytes(b"stored bytes " * 1000)
    key = instance_blob_key(archive.partition, "1.2.3", "1.2.3.4", "1.2.3.4.5", "ab" * 32)
    archive.blobs.put(key, source)

    with Spool(settings.server.data_dir).copy_of(archive, key) as copy:
        assert copy.read() == source.read_bytes()
        # Its file descriptor moves the copy to a file (SpooledTemporaryFile.fileno), unlinked
        # from the start: /proc names the folder it was made in.
        on_disk = Path(os.readlink(f"/proc/self/fd/{copy.fileno()}"))
        assert on_disk.parent == (settings.server.data_dir / "tmp").resolve()
        copy.seek(0)
        assert copy.read() == source.read_bytes()
    assert list((settings.server.data_dir / "tmp").iterdir()) == []
