"""Shared fixtures: the real services (PostgreSQL, an S3 server) and Hilum on both backend pairs.

Every test that takes ``settings`` (or ``archive`` / ``dimse_server``) runs twice: on the
embedded default (SQLite + files) and on PostgreSQL + S3 (SeaweedFS standing in for MinIO).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import urllib3
from sqlalchemy import create_engine, text

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


def free_port() -> int:
    """A free loopback port whose +10000 neighbour is free too (SeaweedFS's gRPC ports), and
    that this test run has not handed out before: two calls in a row may otherwise get the same
    port from the OS (e.g. a server's DIMSE port and its TLS port), which only fails at bind."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 55000 or port in _HANDED_OUT:
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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS ``weed mini``) on loopback for the whole run."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: free_port() for name in ("s3", "master", "filer", "volume", "admin")}
    command = [
        weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={ports['s3']}", f"-master.port={ports['master']}",
        f"-filer.port={ports['filer']}", f"-volume.port={ports['volume']}",
        f"-admin.port={ports['admin']}", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        # Every test gets its own bucket, and SeaweedFS gives each bucket its own volumes:
        # small volumes, as many as the disk holds.
        "-master.volumeSizeLimitMB=16", "-volume.max=0",
    ]  # fmt: skip
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    log = open(data / "weed.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    http = urllib3.PoolManager(retries=False, timeout=2)
    deadline = time.monotonic() + 90
    while True:
        try:
            if http.request("GET", endpoint + "/").status < 500:
                break
        except urllib3.exceptions.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"weed mini did not start; see {data / 'weed.log'}")
        time.sleep(0.5)
    try:
        yield S3Server(endpoint, ports["s3"])
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        process.kill()
        log.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty database on the real PostgreSQL, dropped after the test."""
    with postgres_database() as url:
        yield url


@contextlib.contextmanager
def postgres_database(template: str = "") -> Iterator[str]:
    """A fresh database on the real PostgreSQL (empty, or a copy of the database ``template``),
    dropped on exit."""
    name = f"hilum_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        copy = f' TEMPLATE "{template}"' if template else ""
        conn.execute(text(f'CREATE DATABASE "{name}"{copy}'))
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def migrated_postgres_template() -> Iterator[str]:
    """The name of a PostgreSQL database migrated from empty to the newest schema once per test
    run: the template of every test's database that starts migrated (CREATE DATABASE ...
    TEMPLATE copies it in a fraction of the time the migrations take)."""
    with postgres_database() as url:
        engine = create_index_engine(url, pool_size=1)
        try:
            upgrade_database(engine)
        finally:
            # CREATE DATABASE ... TEMPLATE refuses a template that anyone is connected to.
            engine.dispose()
        yield url.rpartition("/")[2]


@pytest.fixture
def migrated_postgres_url(migrated_postgres_template: str) -> Iterator[str]:
    """A fresh database on the real PostgreSQL at the newest schema (a copy of the session's
    migrated template), dropped after the test."""
    with postgres_database(template=migrated_postgres_template) as url:
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
        if migrated:
            index = settings.server.data_dir / "index.sqlite"
            index.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(request.getfixturevalue("migrated_sqlite_index"), index)
        return settings
    database_url = request.getfixturevalue("migrated_postgres_url" if migrated else "postgres_url")
    return make_settings(
        tmp_path,
        database_url=database_url,
        blob_url=s3_blob_url(request.getfixturevalue("s3_server")),
    )


@pytest.fixture
def archive(settings: Settings) -> Iterator[Archive]:
    archive = open_archive(settings, migrate=True)
    try:
        yield archive
    finally:
        archive.close()


@pytest.fixture
def dimse_server(settings: Settings, archive: Archive) -> Iterator[DimseServer]:
    server = DimseServer(settings, archive)
    server.start()
    try:
        yield server
    finally:
        server.stop()
