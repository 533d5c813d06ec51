"""The blob store interface, on the filesystem and on a real S3 server."""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from storage.archive import Archive
from storage.blobs import FileBlobStore, instance_blob_key, is_blob_key
from storage.errors import NotFound, StorageUnavailable

KEY = instance_blob_key("default", "1.2.3", "1.2.3.4", "1.2.3.4.5", "ab" * 32)


def test_key_is_derived_from_hashes_only() -> None:
    hostile = instance_blob_key("default", "../../etc", "/abs/path", "..\\x", "00" * 32)
    assert is_blob_key(hostile)
    assert ".." not in hostile and "etc" not in hostile and "\\" not in hostile
    # Same study and series: same folders; another instance: another file.
    other = instance_blob_key("default", "1.2.3", "1.2.3.4", "1.2.3.4.6", "ab" * 32)
    assert other.rsplit("/", 1)[0] == KEY.rsplit("/", 1)[0] and other != KEY
    # Another partition: another study folder.
    assert instance_blob_key("other", "1.2.3", "1.2.3.4", "1.2.3.4.5", "ab" * 32) != KEY


def test_put_get_range_exists_delete(archive: Archive, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 1000
    source = tmp_path / "source.bin"
    source.write_bytes(payload)
    blobs = archive.blobs

    assert not blobs.exists(KEY)
    blobs.put(KEY, source)
    assert blobs.exists(KEY)
    with blobs.open(KEY) as stream:
        assert stream.read() == payload
    assert blobs.get_range(KEY, 1000, 300) == payload[1000:1300]
    assert list(blobs.list_keys()) == [KEY]

    blobs.delete(KEY)
    assert not blobs.exists(KEY)
    blobs.delete(KEY)  # deleting a missing blob is not an error
    with pytest.raises(NotFound):
        blobs.open(KEY)
    assert list(blobs.list_keys()) == []


def test_filesystem_put_replaces_atomically_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"first")
    second.write_bytes(b"second version")
    store.put(KEY, first)
    store.put(KEY, second)
    assert store.get_range(KEY, 0, 100) == b"second version"
    assert list(store.list_keys()) == [KEY]


def test_filesystem_refuses_keys_that_are_not_blob_keys(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    source = tmp_path / "a"
    source.write_bytes(b"x")
    for key in ("../outside.dcm", "/etc/passwd", KEY + "/../../x"):
        with pytest.raises(ValueError):
            store.put(key, source)
    assert not (tmp_path / "outside.dcm").exists()


def test_put_may_link_stores_the_file_and_the_caller_may_delete_it(
    archive: Archive, tmp_path: Path
) -> None:
    payload = b"DICM" * 5000
    source = tmp_path / "received.dcm"
    source.write_bytes(payload)
    archive.blobs.put(KEY, source, may_link=True)
    source.unlink()  # what the caller does next
    with archive.blobs.open(KEY) as stream:
        assert stream.read() == payload
    assert list(archive.blobs.list_keys()) == [KEY]


def test_filesystem_put_may_link_links_on_one_filesystem_and_copies_across(
    tmp_path: Path,
) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    same = tmp_path / "same.dcm"
    same.write_bytes(b"same filesystem")
    store.put(KEY, same, may_link=True)
    blob = tmp_path / "blobs" / KEY
    assert same.stat().st_ino == blob.stat().st_ino  # hard-linked, not copied
    store.put(KEY, same, may_link=True)  # again (a retry): the same file, no error
    same.unlink()
    assert store.get_range(KEY, 0, 100) == b"same filesystem"
    assert list(store.list_keys()) == [KEY]  # no temporary name left

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second filesystem (/dev/shm) to test the copy fallback")
    other_key = instance_blob_key("default", "1.2.3", "1.2.3.4", "1.2.3.4.6", "cd" * 32)
    across = Path(tempfile.mkstemp(dir=shm, suffix=".dcm")[1])
    try:
        across.write_bytes(b"another filesystem")
        store.put(other_key, across, may_link=True)  # EXDEV: copied instead
        assert store.get_range(other_key, 0, 100) == b"another filesystem"
    finally:
        across.unlink(missing_ok=True)
    assert sorted(store.list_keys()) == sorted([KEY, other_key])


def _keys(n: int, series: str = "1.2.3.4") -> list[str]:
    return [
        instance_blob_key("default", "1.2.3", series, f"1.2.3.4.{i}", "ab" * 32) for i in range(n)
    ]


def test_put_all_stores_every_blob(archive: Archive, tmp_path: Path) -> None:
    blobs = []
    for n, key in enumerate(_keys(4) + _keys(1, series="1.2.3.9")):
        source = tmp_path / f"{n}.dcm"
        source.write_bytes(f"blob {n}".encode() * 100)
        blobs.append((key, source, n % 2 == 0))  # linked and copied alike
    assert archive.blobs.put_all(blobs) == [None] * 5
    for key, source, _may_link in blobs:
        with archive.blobs.open(key) as stream:
            assert stream.read() == source.read_bytes()
    assert sorted(archive.blobs.list_keys()) == sorted(key for key, _, _ in blobs)


STRACE = "/usr/bin/strace"  # Debian's strace (make system-deps)
# Run under strace: put_all twice into the same folders (first new names, then existing ones);
# between them an fsync of the source file marks where the second begins.
_PUT_ALL = """
import os, sys
from pathlib import Path
from storage.blobs import FileBlobStore
root, source, keys = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
store = FileBlobStore(root)
for again in (False, True):
    if again:
        with open(source, "rb") as marker:
            os.fsync(marker.fileno())
    assert store.put_all([(key, source, True) for key in keys]) == [None] * len(keys)
"""
# Each sync with the path of its file descriptor (-y); each link and rename with its new name
# (the last quoted argument).
_CALL = re.compile(
    r'(fsync|fdatasync)\(\d+<([^>]*)>\) += 0|(link|rename)\w*\(.*"([^"]*)"[^"\n]*\) += 0'
)


def test_filesystem_put_all_syncs_each_folder_once(tmp_path: Path) -> None:
    """Counted by the kernel's account of it (strace): each folder that received blobs is
    fsynced once, however many blobs it received; the folders above a series' folder (its new
    entry in its study's folder, and so on up to the root) the first time only, once each; every
    blob's data is synced, after its link to a new name (one journal commit for both), before
    it replaces an existing name."""
    root, source = tmp_path / "blobs", tmp_path / "a.dcm"
    source.write_bytes(b"x")
    FileBlobStore(root)  # the root exists before the traced process starts
    keys = _keys(3) + _keys(2, series="1.2.3.9")
    trace = tmp_path / "fsync.trace"
    calls = "fsync,fdatasync,link,linkat,rename,renameat,renameat2"  # whichever libc uses
    subprocess.run(
        [STRACE, "-f", "-qq", "-y", "-e", f"trace={calls}", "-o", str(trace),
         sys.executable, "-c", _PUT_ALL, str(root), str(source), *keys],
        check=True, cwd=Path(__file__).parents[2], timeout=120,
    )  # fmt: skip
    traced = [
        (m.group(1), Path(m.group(2))) if m.group(1) else (m.group(3), Path(m.group(4)))
        for m in _CALL.finditer(trace.read_text())
    ]
    marker = traced.index(("fsync", source))
    first, second = traced[:marker], traced[marker + 1 :]
    series = {(root / key).parent for key in keys}
    above = {folder.parent for folder in series}  # the study's folder
    above |= {folder.parent for folder in above} | {root}  # its prefix folder, the root
    for calls_made, folders in ((first, series | above), (second, series)):
        assert sorted(path for call, path in calls_made if call == "fsync") == sorted(folders)
    # New names: linked, then synced.
    blobs = [(call, path) for call, path in first if call != "fsync"]
    assert blobs == [step for key in keys for step in (("link", root / key), ("fdatasync", source))]
    # Existing names: synced, linked under a temporary name, renamed over the old one.
    blobs = [(call, path) for call, path in second if call in ("fdatasync", "rename")]
    synced_first = [(("fdatasync", source), ("rename", root / key)) for key in keys]
    assert blobs == [step for steps in synced_first for step in steps]


def test_filesystem_put_all_refuses_the_rest_once_the_store_refuses(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    source = tmp_path / "a.dcm"
    source.write_bytes(b"x")
    first, *rest = _keys(3)
    study_folder = tmp_path / "blobs" / first.split("/")[0]
    study_folder.write_bytes(b"")  # a file where the folder must go: mkdir fails
    refusals = store.put_all([(key, source, False) for key in [first, *rest]])
    assert isinstance(refusals[0], StorageUnavailable)
    assert refusals[1] is refusals[0] and refusals[2] is refusals[0]  # not tried again
    assert list(store.list_keys()) == [first.split("/")[0]]  # only the obstacle is there
