"""The blob store: where the DICOM files themselves live.

One small interface with two backends: the local filesystem (the embedded default) and S3
(MinIO in production). Keys are made by :func:`instance_blob_key` from hashes, never from a
string a client sent, so no key can name a path outside the store.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol
from urllib.parse import parse_qs, urlsplit

import urllib3
from minio import Minio
from minio.error import S3Error

from storage.errors import NotFound, StorageUnavailable

_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}/[0-9a-f]{64}/[0-9a-f]{64}\.[0-9a-f]{16}\.dcm$")
# What an interrupted write of the filesystem store leaves in a blob's folder: the temporary
# name of _copy (mkstemp) or _link.
_LEFTOVER = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}/[0-9a-f]{64}/\.tmp-[A-Za-z0-9_]{1,32}$")
_COPY_CHUNK = 1 << 20
# os.link's errors that mean "copy instead": another filesystem, no hard links there.
_NO_HARD_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


# Folders FileBlobStore remembers as durable (an LRU): a few hundred bytes each; a series
# forgotten costs three more folder fsyncs when it is written to again.
_DURABLE_FOLDERS_KEPT = 4096


def _uid_hash(*parts: str) -> str:
    return hashlib.sha256("\\".join(parts).encode("ascii")).hexdigest()


def instance_blob_key(
    partition: str, study_uid: str, series_uid: str, sop_uid: str, content_sha256: str
) -> str:
    """The key of one stored instance version.

    Grouped by study and series so that a study's files lie together; the content hash suffix
    gives a replacement its own key, so the old file stays until the new index row commits.
    """
    study = _uid_hash(partition, study_uid)
    return (
        f"{study[:2]}/{study}/{_uid_hash(partition, study_uid, series_uid)}/"
        f"{_uid_hash(partition, sop_uid)}.{content_sha256[:16]}.dcm"
    )


def is_blob_key(key: str) -> bool:
    return bool(_KEY.match(key))


def is_leftover(key: str) -> bool:
    """A temporary name an interrupted filesystem write left (never a stored blob)."""
    return bool(_LEFTOVER.match(key))


class BlobStream(Protocol):
    """What :meth:`BlobStore.open` returns: the blob, read front to back, then closed (an open
    file, or an S3 response that goes back to its connection pool on close)."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> BlobStream: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> None: ...


PRIMARY_TIER = ""  # instance.tier of a blob in the primary blob store


class PendingPuts(Protocol):
    """What :meth:`BlobStore.start_put_all` returns: the puts, under way or made."""

    def wait(self) -> list[StorageUnavailable | None]:
        """Once every put is finished: for each blob, what refused it (None: stored, durably),
        as :meth:`BlobStore.put_all` answers. May be called again (the same answer)."""


class PutsMade:
    """:class:`PendingPuts` of a store that made them before answering."""

    def __init__(self, refusals: list[StorageUnavailable | None]) -> None:
        self.refusals = refusals

    def wait(self) -> list[StorageUnavailable | None]:
        return self.refusals


def unknown_tier(key: str, tier: str) -> StorageUnavailable:
    """What a read of a blob that the index places in a storage tier the configuration does
    not name raises: the administrator's fix, not a missing file."""
    return StorageUnavailable(
        f"blob {key} is in storage tier {tier!r} according to the index, but no tier of that "
        "name is configured ([[storage.tiers]]): put the tier back in the configuration, with "
        "its blob URL, to read its studies (see docs/operations.md, Storage tiers)"
    )


class BlobStore(Protocol):
    def put(self, key: str, path: Path, *, may_link: bool = False) -> None:
        """:meth:`put_all` of one blob, raising what refused it."""

    def put_all(self, blobs: Sequence[tuple[str, Path, bool]]) -> list[StorageUnavailable | None]:
        """Store each file ``path`` under ``key``, durably, replacing nothing half-way; for
        each, what refused it (None: stored). Durable when this returns, not before.

        ``(key, path, may_link)``; ``may_link``: the file is Hilum's own temporary file, never
        written again (the caller deletes it afterwards), so a backend may hard-link it into
        the store instead of copying. Once the store refuses one (unreachable, full), the
        rest get the same answer without each waiting for it in turn (a local store: the
        first refusal's; S3: each its own, the PUTs made at once).
        """

    def start_put_all(self, blobs: Sequence[tuple[str, Path, bool]]) -> PendingPuts:
        """:meth:`put_all`, begun: a store over the network (S3) makes its PUTs on threads of
        its own while the caller goes on (ingest writes the index rows meanwhile, and commits
        them only once :meth:`PendingPuts.wait` said stored); a local store makes them before
        it returns. The caller waits for them in every case, also when it gives up: a blob
        must not appear after the caller decided to delete it."""

    def open(self, key: str, *, tier: str = PRIMARY_TIER) -> BlobStream:
        """A readable stream of the whole blob; the caller closes it. ``tier``: the storage
        tier the index names for the blob (``instance.tier``); a store without tiers refuses
        any but the primary (:func:`unknown_tier`)."""

    def get_range(self, key: str, offset: int, length: int, *, tier: str = PRIMARY_TIER) -> bytes:
        """``length`` bytes from ``offset``, in one read from the backend; ``tier`` as for
        :meth:`open`."""

    def delete(self, key: str) -> None:
        """Remove the blob; removing a missing blob is not an error."""

    def exists(self, key: str) -> bool: ...

    def check(self) -> None:
        """Raise :class:`StorageUnavailable` unless the store answers (readiness)."""

    def list_keys(self) -> Iterator[str]:
        """Every key in the store, in no particular order (for ``hilum verify``)."""

    def list_modified(self) -> Iterator[tuple[str, float]]:
        """Every key with the POSIX time it was last written, in no particular order (for
        ``hilum verify --repair``, which leaves young orphans alone)."""


class FileBlobStore:
    """Blobs as files under ``root``: written to a temporary file, its data synced
    (``fdatasync``), then renamed (or hard-linked: :meth:`_link`); the folder fsynced after,
    and once per process the folders above it (a new series' folder is a new entry in its
    study's folder, and so on up)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create blob directory {self.root}: {exc}") from exc
        # Blob folders whose own entries (and their parents', up to the root) this process has
        # made durable: only the folder itself is fsynced for the blobs put into it later.
        # Sound because nothing removes a blob folder (a removed one, made again, would need
        # its entry synced again).
        self._durable_folders: OrderedDict[Path, None] = OrderedDict()
        self._durable_lock = threading.Lock()

    def _path(self, key: str) -> Path:
        if not is_blob_key(key):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key

    def put(self, key: str, path: Path, *, may_link: bool = False) -> None:
        _raise_refusal(self.put_all([(key, path, may_link)]))

    def start_put_all(self, blobs: Sequence[tuple[str, Path, bool]]) -> PendingPuts:
        """Made at once (:meth:`put_all`): a local write's waits are short, and a thread's
        hand-overs of the interpreter lock would cost more than they overlap."""
        return PutsMade(self.put_all(blobs))

    def put_all(self, blobs: Sequence[tuple[str, Path, bool]]) -> list[StorageUnavailable | None]:
        """Each file is written under a temporary name in its folder, synced and renamed into
        place, or linked (:meth:`_link`); then each folder is fsynced once, which makes every
        new name in it survive a power loss: a group of one series' instances costs one folder
        fsync (:meth:`_sync_folder`).

        One file after the other, not in threads: the GIL hand-overs around each system call
        cost more than the overlapped fsync waits save (0.5 ms of wall time per 9 KB blob
        with 8 threads, against 0.17 ms in a row, measured on 2 cores).
        """
        refusals: list[StorageUnavailable | None] = []
        unsynced: dict[Path, list[int]] = {}  # folder -> the blobs renamed into it
        refused: StorageUnavailable | None = None
        for key, path, may_link in blobs:
            target = self._path(key)
            if refused is None:
                try:
                    if target.parent not in unsynced:
                        target.parent.mkdir(parents=True, exist_ok=True)
                    if not (may_link and self._link(path, target)):
                        self._copy(path, target)
                except OSError as exc:
                    refused = StorageUnavailable(f"cannot write blob {key}: {exc.strerror or exc}")
                else:
                    unsynced.setdefault(target.parent, []).append(len(refusals))
            refusals.append(refused)
        synced_above: set[Path] = set()
        for folder, placed in unsynced.items():
            try:
                self._sync_folder(folder, synced_above)
            except OSError as exc:
                refusal = StorageUnavailable(f"cannot sync {folder}: {exc.strerror or exc}")
                for n in placed:
                    refusals[n] = refusal
        return refusals

    def _sync_folder(self, folder: Path, synced_above: set[Path]) -> None:
        """Make the renames into ``folder`` durable, and the folder's own entry: the first time
        this process puts a blob into it, every folder above it up to the root is fsynced too
        (it may have been created just now, by this process or another one, whose fsync of
        its parent may not have happened yet), once per call of :meth:`put_all`
        (``synced_above``). Afterwards the folder alone: a series costs its folder's fsync per
        group, not three more per instance."""
        _fsync_directory(folder)
        with self._durable_lock:
            if folder in self._durable_folders:
                self._durable_folders.move_to_end(folder)
                return
        above = folder
        while above != self.root and (above := above.parent) not in synced_above:
            _fsync_directory(above)
            synced_above.add(above)
        with self._durable_lock:
            self._durable_folders[folder] = None
            if len(self._durable_folders) > _DURABLE_FOLDERS_KEPT:
                self._durable_folders.popitem(last=False)

    @staticmethod
    def _copy(path: Path, target: Path) -> None:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with open(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
                out.flush()
                os.fdatasync(out.fileno())  # as _sync_data
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise

    @staticmethod
    def _link(path: Path, target: Path) -> bool:
        """Hard-link ``path`` into place as ``target``, its data synced; False where links
        cannot be made (another filesystem, or one without hard links): the caller copies
        instead. The caller's name stays valid, so a retry can place the same file again, and
        deleting it leaves the blob.

        A new name is linked first and the data synced after (``fdatasync``): on a journalling
        filesystem that one journal commit also carries the new entry, so the folder's fsync
        that follows finds little left to do. Until then the name may lead to data a power loss
        would not keep, but no index row can refer to it yet (rows are committed after
        :meth:`put_all` returns): after a crash it is an orphan, and the same content sent again
        takes the other path. A name that exists already (a committed row may refer to it; the
        key carries the content hash, so it holds the same content) is replaced only by data
        synced first: linked under a temporary name and renamed over it.
        """
        try:
            os.link(path, target)
        except FileExistsError:
            return FileBlobStore._replace_by_link(path, target)
        except OSError as exc:
            if exc.errno in _NO_HARD_LINK:
                return False
            raise
        _sync_data(path)
        return True

    @staticmethod
    def _replace_by_link(path: Path, target: Path) -> bool:
        _sync_data(path)
        tmp_name = target.parent / f".tmp-{os.urandom(8).hex()}"
        try:
            os.link(path, tmp_name)
        except OSError as exc:
            if exc.errno in _NO_HARD_LINK:
                return False
            raise
        try:
            os.replace(tmp_name, target)
        finally:
            # POSIX rename(2): when both names already link the same file (a retry placing the
            # same file again) it does nothing, and the temporary name would stay.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        return True

    def open(self, key: str, *, tier: str = PRIMARY_TIER) -> BinaryIO:
        if tier != PRIMARY_TIER:
            raise unknown_tier(key, tier)
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise NotFound(f"blob {key} does not exist") from exc
        except OSError as exc:
            raise StorageUnavailable(f"cannot read blob {key}: {exc.strerror or exc}") from exc

    def get_range(self, key: str, offset: int, length: int, *, tier: str = PRIMARY_TIER) -> bytes:
        with self.open(key, tier=tier) as f:
            f.seek(offset)
            return f.read(length)

    def delete(self, key: str) -> None:
        try:
            path = self.root / key if is_leftover(key) else self._path(key)
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot delete blob {key}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except OSError as exc:
            raise StorageUnavailable(f"cannot stat blob {key}: {exc.strerror or exc}") from exc

    def check(self) -> None:
        if not self.root.is_dir():
            raise StorageUnavailable(f"blob directory {self.root} is missing")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"blob directory {self.root} is not writable")

    def list_keys(self) -> Iterator[str]:
        if not self.root.is_dir():
            raise StorageUnavailable(f"blob directory {self.root} is missing")
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                yield os.path.relpath(os.path.join(dirpath, name), self.root)

    def list_modified(self) -> Iterator[tuple[str, float]]:
        for key in self.list_keys():
            try:
                yield key, (self.root / key).lstat().st_mtime
            except FileNotFoundError:
                continue  # deleted since it was listed


class S3BlobStore:
    """Blobs as objects in one S3 bucket (MinIO, SeaweedFS, or any S3)."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        max_connections: int,
        storage_class: str = "",
    ) -> None:
        """``storage_class``: every object written gets it (``x-amz-storage-class``);
        empty: the bucket's default."""
        url = urlsplit(endpoint)
        self.storage_class = storage_class
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"S3 endpoint must be http(s)://host:port, not {endpoint!r}")
        self.bucket = bucket
        # Fail fast when the store is unreachable: the SCU is waiting for a status.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=60),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503)),
            maxsize=max_connections,
        )
        self.client = Minio(
            url.netloc,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=url.scheme == "https",
            http_client=http,
        )
        with self._unavailable_on_error(f"bucket {bucket}"):
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)
        # Started as PUTs come and kept while the process runs; an idle one waits on its
        # queue, using no CPU.
        self._putter = ThreadPoolExecutor(max_connections, thread_name_prefix="s3-put")

    @contextlib.contextmanager
    def _unavailable_on_error(self, what: str) -> Iterator[None]:
        try:
            yield
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFound(f"blob {what} does not exist") from exc
            raise StorageUnavailable(f"S3 error on {what}: {exc.code} {exc.message}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageUnavailable(f"S3 store unreachable ({what}): {exc}") from exc

    def put(self, key: str, path: Path, *, may_link: bool = False) -> None:
        _raise_refusal(self.put_all([(key, path, may_link)]))

    def put_all(self, blobs: Sequence[tuple[str, Path, bool]]) -> list[StorageUnavailable | None]:
        return self.start_put_all(blobs).wait()

    def start_put_all(self, blobs: Sequence[tuple[str, Path, bool]]) -> PendingPuts:
        """One PUT each, all at once on the store's threads (at most its connections): a PUT's
        time is mostly the server's, so a group's PUTs overlap one another and the caller's
        own work; an object appears only when complete."""
        for key, _path, _may_link in blobs:
            if not is_blob_key(key):
                raise ValueError(f"not a blob key: {key!r}")
        return _S3Puts([self._putter.submit(self._put_one, key, path) for key, path, _ in blobs])

    def _put_one(self, key: str, path: Path) -> StorageUnavailable | None:
        try:
            with self._unavailable_on_error(key):
                self.client.fput_object(
                    self.bucket, key, str(path), content_type="application/dicom",
                    metadata=self._put_headers,
                )  # fmt: skip
        except StorageUnavailable as error:
            return error
        return None

    @property
    def _put_headers(self) -> dict[str, str | list[str] | tuple[str]] | None:
        # minio sends metadata keys starting with x-amz- as request headers, as they are.
        return {"x-amz-storage-class": self.storage_class} if self.storage_class else None

    def open(self, key: str, *, tier: str = PRIMARY_TIER) -> BlobStream:
        if tier != PRIMARY_TIER:
            raise unknown_tier(key, tier)
        with self._unavailable_on_error(key):
            response = self.client.get_object(self.bucket, key)
        return _S3Stream(response)

    def get_range(self, key: str, offset: int, length: int, *, tier: str = PRIMARY_TIER) -> bytes:
        if tier != PRIMARY_TIER:
            raise unknown_tier(key, tier)
        with self._unavailable_on_error(key):
            response = self.client.get_object(self.bucket, key, offset=offset, length=length)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def delete(self, key: str) -> None:
        with self._unavailable_on_error(key):
            self.client.remove_object(self.bucket, key)

    def exists(self, key: str) -> bool:
        try:
            with self._unavailable_on_error(key):
                self.client.stat_object(self.bucket, key)
        except NotFound:
            return False
        return True

    def check(self) -> None:
        with self._unavailable_on_error(f"bucket {self.bucket}"):
            if not self.client.bucket_exists(self.bucket):
                raise StorageUnavailable(f"S3 bucket {self.bucket} does not exist")

    def list_keys(self) -> Iterator[str]:
        with self._unavailable_on_error("listing"):
            for obj in self.client.list_objects(self.bucket, recursive=True):
                if obj.object_name is not None:
                    yield obj.object_name

    def list_modified(self) -> Iterator[tuple[str, float]]:
        with self._unavailable_on_error("listing"):
            for obj in self.client.list_objects(self.bucket, recursive=True):
                if obj.object_name is not None:
                    # Unknown: as if written just now, so never old enough to remove.
                    modified = obj.last_modified.timestamp() if obj.last_modified else math.inf
                    yield obj.object_name, modified


def _raise_refusal(refusals: list[StorageUnavailable | None]) -> None:
    for refusal in refusals:
        if refusal is not None:
            raise refusal


def _sync_data(path: Path) -> None:
    """Make a file's data durable, and what reading it back needs (its size, its blocks), not
    its times: ``fdatasync``."""
    with open(path, "rb") as src:
        os.fdatasync(src.fileno())


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk without waiting for them (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that its later ``fdatasync`` waits less:
    called by a writer when the file is complete, while other work (its parse, its index row)
    goes on. Where the call does not exist, nothing: the ``fdatasync`` does it all."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a hint: its failure changes nothing


def _load_sync_file_range() -> Any:
    # The process's own symbols, libc's among them (no library search: no subprocess).
    function = getattr(ctypes.CDLL(None), "sync_file_range", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>
_sync_file_range = _load_sync_file_range() if sys.platform == "linux" else None


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` survive a power loss."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _S3Puts:
    """:class:`PendingPuts` of :meth:`S3BlobStore.start_put_all`."""

    def __init__(self, futures: list[Future[StorageUnavailable | None]]) -> None:
        self._futures = futures

    def wait(self) -> list[StorageUnavailable | None]:
        return [future.result() for future in self._futures]


class _S3Stream:
    """A file-like wrapper that returns the connection to the pool on close."""

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self._response = response

    def read(self, size: int = -1) -> bytes:
        return self._response.read(None if size < 0 else size)

    def close(self) -> None:
        self._response.close()
        self._response.release_conn()

    def __enter__(self) -> _S3Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_blob_store(
    blob_url: str,
    *,
    access_key: str = "",
    secret_key: str = "",
    max_connections: int = 32,
    storage_class: str = "",
) -> BlobStore:
    """``file:///abs/path`` or ``s3://BUCKET?endpoint=http://host:9000`` (``storage_class``:
    of the objects it writes, S3 only)."""
    url = urlsplit(blob_url)
    if url.scheme == "file":
        return FileBlobStore(Path(url.path))
    if url.scheme == "s3":
        endpoint = parse_qs(url.query).get("endpoint", [""])[0]
        if not url.netloc or not endpoint:
            raise ValueError(
                f"S3 blob URL must be s3://BUCKET?endpoint=http://host:port: {blob_url}"
            )
        return S3BlobStore(
            endpoint, url.netloc, access_key, secret_key, max_connections, storage_class
        )
    raise ValueError(f"unsupported blob_url scheme {url.scheme!r} (use file:// or s3://)")
