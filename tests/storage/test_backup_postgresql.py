"""Backup and restore of the production shape as docs/operations.md tells the administrator:
``pg_dump`` of the PostgreSQL index first, then a copy of the bucket (``mc mirror`` in the docs;
here the AWS CLI's ``aws s3 sync``, the same copy for any S3 server), restored onto an empty
database and an empty bucket. ``hilum verify`` is clean and the queries answer as before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from config import Settings
from tests.conftest import (
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    S3Server,
    make_settings,
    postgres_database,
    s3_blob_url,
)
from tests.server.test_cli import _hilum, _series
from tests.storage.test_backup import _answers

# The AWS CLI of the test extra (pyproject.toml), beside this interpreter.
AWS = str(Path(sys.executable).parent / "aws")

pytestmark = pytest.mark.parametrize("backend", ["postgresql-s3"], indirect=True)


def _libpq(database_url: str) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _run(*command: str, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, f"{command[0]}: {result.stderr[-3000:]}"
    return result


def _s3(blob_url: str, *args: str) -> subprocess.CompletedProcess:
    endpoint = parse_qs(urlsplit(blob_url).query)["endpoint"][0]
    return _run(AWS, "--endpoint-url", endpoint, "s3", *args,
                AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY,
                AWS_DEFAULT_REGION="us-east-1")  # fmt: skip


def _bucket(blob_url: str) -> str:
    return f"s3://{urlsplit(blob_url).netloc}"


def test_pg_dump_and_a_bucket_copy_restore_onto_an_empty_stack(
    settings: Settings, tmp_path: Path, s3_server: S3Server
) -> None:
    for n in range(2):
        _series(tmp_path / "incoming" / str(n), 3)
    assert _hilum(settings, "import", str(tmp_path / "incoming")).returncode == 0
    before = _answers(settings)
    assert len(before) == 2 + 6

    # Back up while Hilum could be running: the index first, then the blobs.
    backup = tmp_path / "backup"
    backup.mkdir()
    _run("pg_dump", "--format=custom", "--file", str(backup / "index.dump"),
         "--dbname", _libpq(settings.database_url))  # fmt: skip
    # A study received between the two: its blobs are copied, its rows are not in the dump.
    _series(tmp_path / "late", 2)
    assert _hilum(settings, "import", str(tmp_path / "late")).returncode == 0
    _s3(settings.blob_url, "sync", _bucket(settings.blob_url), str(backup / "blobs"))
    assert len(list((backup / "blobs").rglob("*.dcm"))) == 8

    # The stack is lost; a new, empty one: its database at the current schema, its bucket.
    with postgres_database() as database_url:
        restored = make_settings(tmp_path / "restored", database_url=database_url,
                                 blob_url=s3_blob_url(s3_server))  # fmt: skip
        _s3(restored.blob_url, "mb", _bucket(restored.blob_url))
        assert _hilum(restored, "db", "upgrade").returncode == 0
        _run("pg_restore", "--clean", "--if-exists", "--no-owner",
             "--dbname", _libpq(database_url), str(backup / "index.dump"))  # fmt: skip
        _s3(restored.blob_url, "sync", str(backup / "blobs"), _bucket(restored.blob_url))
        assert _hilum(restored, "db", "upgrade").returncode == 0

        verified = _hilum(restored, "verify")
        # Every indexed instance has its blob, checksum included; the late study's two blobs
        # are orphans, as the docs say, and removed on request.
        assert "6 instances checked: 0 missing blobs, 0 checksum mismatches, 2 orphan blobs" in (
            verified.stdout
        ), verified.stdout + verified.stderr
        assert verified.returncode == 1
        removed = _hilum(restored, "verify", "--repair", "--orphan-grace-s", "0")
        assert "2 orphan blobs removed" in removed.stdout, removed.stdout + removed.stderr
        clean = _hilum(restored, "verify")
        assert clean.returncode == 0, clean.stdout
        assert "6 instances checked: 0 missing blobs, 0 checksum mismatches, 0 orphan" in (
            clean.stdout
        )
        assert _answers(restored) == before
