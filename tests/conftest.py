"""Shared fixtures: the real services (PostgreSQL, an S3 server) and Hilum on both backend pairs.

Every test that takes ``settings`` (or ``archive`` / ``dimse_server``) runs twice: on the
embedded default (SQLite + files) and on PostgreSQL + S3 (SeaweedFS standing in for MinIO).
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import urllib3
from sqlalchemy import Engine, create_engine, text

from config import Settings, load_settings
from server.dimse.ae import DimseServer
from storage.archive import Archive, open_archive
from storage.index.database import create_index_engine, upgrade_database

POSTGRES_ADMIN_URL = os.environ.get(
    "HILUM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
S3_ACCESS_KEY, S3_SECRET_KEY = "hilum-test", "hilum-test-secret"
BACKENDS = ["sqlite-files", "postgresql-s3"]


_HANDED_OUT: set[int] = set()
# Under pytest-xdist each worker process hands out only its own class of ports (the port modulo
# 10000, halved, modulo the number of workers), so two workers never hand out the same port; a
# port and its +10000 neighbour fall in the same class. Halved: Linux gives bind(("", 0)) odd
# ports only, so with an even number of workers the port itself would leave some classes
# empty (their workers would never get one).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def _port_class(port: int) -> int:
    return port % 10000 // 2 % _WORKERS


def free_port() -> int:
    """A free loopback port whose +10000 neighbour is free too (SeaweedFS's gRPC ports), and
    that this test run has not handed out before: two calls in a row may otherwise get the same
    port from the OS (e.g. a server's DIMSE port and its TLS port), which only fails at bind."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 55000 or port in _HANDED_OUT or _port_class(port) != _WORKER:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    port: int


class SeaweedFS:
    """A real S3 server (SeaweedFS ``weed mini``) on loopback, its data under ``data``; it can be
    stopped and started again on the same ports and data (tests/test_scale_out.py)."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.ports = {name: free_port() for name in ("s3", "master", "filer", "volume", "admin")}
        self.server = S3Server(f"http://127.0.0.1:{self.ports['s3']}", self.ports["s3"])
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> S3Server:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        ports = self.ports
        command = [
            weed, "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={ports['s3']}", f"-master.port={ports['master']}",
            f"-filer.port={ports['filer']}", f"-volume.port={ports['volume']}",
            f"-admin.port={ports['admin']}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Every test gets its own bucket, and SeaweedFS gives each bucket its own volumes:
            # small volumes, as many as the disk holds.
            "-master.volumeSizeLimitMB=16", "-volume.max=0",
        ]  # fmt: skip
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}  # fmt: skip
        with open(self.data / "weed.log", "ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        http = urllib3.PoolManager(retries=False, timeout=2)
        deadline = time.monotonic() + 90
        while True:
            try:
                if http.request("GET", self.server.endpoint + "/").status < 500:
                    return self.server
            except urllib3.exceptions.HTTPError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed mini did not start; see {self.data / 'weed.log'}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(10)
        self._process.kill()
        self._process.wait()
        self._process = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS ``weed mini``) on loopback for the whole run (each xdist
    worker's)."""
    seaweedfs = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield seaweedfs.start()
    finally:
        seaweedfs.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty database on the real PostgreSQL, dropped after the test."""
    with postgres_database() as url:
        yield url


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty database on the real PostgreSQL, dropped on exit."""
    name = f"hilum_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _admin_engine() -> Engine:
    return create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_size=1)


class MigratedDatabases:
    """Fresh databases at the newest schema, copies of one template migrated from empty once
    per run (CREATE DATABASE ... TEMPLATE instead of the migrations in every test), made ahead
    of the tests and dropped behind them on a thread of their own: every test still gets a
    database no other test has used, without waiting for CREATE or DROP DATABASE, the slowest
    part of a test on PostgreSQL."""

    def __init__(self, template: str, ahead: int = 2) -> None:
        self.template = template
        self._admin = _admin_engine()
        self._made: queue.Queue[str | BaseException] = queue.Queue(maxsize=ahead)
        self._done: queue.Queue[str | None] = queue.Queue()
        self._closing = threading.Event()
        self._not_dropped: list[str] = []
        self._threads = [
            threading.Thread(target=self._make, name="make test databases", daemon=True),
            threading.Thread(target=self._drop, name="drop test databases", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def take(self) -> str:
        """The name of a fresh database; raises what making it raised."""
        made = self._made.get(timeout=300)
        if isinstance(made, BaseException):
            raise made
        return made

    def give_back(self, name: str) -> None:
        self._done.put(name)

    def close(self) -> None:
        self._closing.set()
        self._threads[0].join()
        while not self._made.empty():
            made = self._made.get()
            if isinstance(made, str):
                self._done.put(made)
        self._done.put(None)
        self._threads[1].join()
        self._admin.dispose()
        if self._not_dropped:
            raise RuntimeError(f"test databases not dropped: {self._not_dropped}")

    def _make(self) -> None:
        while not self._closing.is_set():
            name = f"hilum_test_{uuid.uuid4().hex[:12]}"
            made: str | BaseException = name
            try:
                with self._admin.connect() as conn:
                    conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'))
            except Exception as error:  # handed to the test that takes it
                made = error
            while not self._closing.is_set():
                with contextlib.suppress(queue.Full):
                    self._made.put(made, timeout=0.2)
                    break
            else:
                if isinstance(made, str):
                    self._done.put(made)

    def _drop(self) -> None:
        while (name := self._done.get()) is not None:
            try:
                with self._admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            except Exception as error:  # reported by close()
                self._not_dropped.append(f"{name} ({error})")


@pytest.fixture(scope="session")
def migrated_databases() -> Iterator[MigratedDatabases]:
    with postgres_database() as url:
        engine = create_index_engine(url, pool_size=1)
        try:
            upgrade_database(engine)
        finally:
            # CREATE DATABASE ... TEMPLATE refuses a template that anyone is connected to.
            engine.dispose()
        databases = MigratedDatabases(url.rpartition("/")[2])
        try:
            yield databases
        finally:
            databases.close()


@contextlib.contextmanager
def migrated_postgres(databases: MigratedDatabases) -> Iterator[str]:
    """The URL of a fresh database at the newest schema, dropped on exit."""
    name = databases.take()
    try:
        yield f"{POSTGRES_ADMIN_URL.rpartition('/')[0]}/{name}"
    finally:
        databases.give_back(name)


@pytest.fixture
def migrated_postgres_url(migrated_databases: MigratedDatabases) -> Iterator[str]:
    """A fresh database on the real PostgreSQL at the newest schema, dropped after the test."""
    with migrated_postgres(migrated_databases) as url:
        yield url


@pytest.fixture(scope="session")
def migrated_sqlite_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite index migrated from empty to the newest schema once per test run, copied into
    the data directory of every test whose index starts migrated."""
    path = tmp_path_factory.mktemp("migrated-index") / "index.sqlite"
    engine = create_index_engine(f"sqlite:///{path}", pool_size=1)
    try:
        upgrade_database(engine)
    finally:
        engine.dispose()  # the last connection's close folds the WAL into the file
    return path


def starts_migrated(request: pytest.FixtureRequest) -> bool:
    """Whether the test's index database may start as a copy of the migrated template: when it
    takes ``archive``, which migrates it before the test sees it anyway (``open_archive`` finds
    it at the newest schema). A test of the migrations, or of an index not yet upgraded, does
    not take ``archive`` and gets an empty database."""
    return "archive" in request.fixturenames


def make_settings(
    tmp_path: Path, *, database_url: str = "", blob_url: str = "", **sections: dict
) -> Settings:
    storage = {
        "database_url": database_url,
        "blob_url": blob_url,
        "s3_access_key": S3_ACCESS_KEY if blob_url else "",
        "s3_secret_key": S3_SECRET_KEY if blob_url else "",
        **sections.pop("storage", {}),
    }
    dimse = {"port": free_port(), "network_timeout_s": 10, **sections.pop("dimse", {})}
    http = {"port": free_port(), **sections.pop("http", {})}
    return load_settings(
        None,
        server={"data_dir": tmp_path / "hilum-data"},
        dimse=dimse,
        http=http,
        storage=storage,
        **sections,
    )


def s3_blob_url(s3: S3Server | str) -> str:
    endpoint = s3 if isinstance(s3, str) else s3.endpoint
    return f"s3://hilum-{uuid.uuid4().hex[:12]}?endpoint={endpoint}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings on ``backend``; the index database is empty, or already migrated from the
    session's template where the test takes ``archive`` (:func:`starts_migrated`)."""
    migrated = starts_migrated(request)
    if backend == "sqlite-files":
        settings = make_settings(tmp_path)
        index = settings.server.data_dir / "index.sqlite"
        if migrated and not index.exists():  # never over an index a fixture already opened
            index.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(request.getfixturevalue("migrated_sqlite_index"), index)
        return settings
    database_url = request.getfixturevalue("migrated_postgres_url" if migrated else "postgres_url")
    return make_settings(
        tmp_path,
        database_url=database_url,
        blob_url=s3_blob_url(request.getfixturevalue("s3_server")),
    )


@contextlib.contextmanager
def shared_archive(
    backend: str, request: pytest.FixtureRequest, directory: Path
) -> Iterator[tuple[Settings, Archive]]:
    """Settings and an open archive on ``backend`` in ``directory``, at the newest schema, for
    a module-scoped fixture: seeded once and shared by tests that only read it."""
    with contextlib.ExitStack() as stack:
        if backend == "sqlite-files":
            settings = make_settings(directory)
        else:
            databases = request.getfixturevalue("migrated_databases")
            settings = make_settings(
                directory,
                database_url=stack.enter_context(migrated_postgres(databases)),
                blob_url=s3_blob_url(request.getfixturevalue("s3_server")),
            )
        archive = open_archive(settings, migrate=True)
        stack.callback(archive.close)
        yield settings, archive


@pytest.fixture
def archive(settings: Settings) -> Iterator[Archive]:
    archive = open_archive(settings, migrate=True)
    try:
        yield archive
    finally:
        archive.close()


@contextlib.contextmanager
def running_dimse(settings: Settings, archive: Archive) -> Iterator[DimseServer]:
    """A started DIMSE server over ``archive``, stopped on exit."""
    server = DimseServer(settings, archive)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dimse_server(settings: Settings, archive: Archive) -> Iterator[DimseServer]:
    with running_dimse(settings, archive) as server:
        yield server
