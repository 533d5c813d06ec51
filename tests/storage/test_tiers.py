"""Storage tiers on both backend pairs (a second folder, or a second S3 bucket, as the cold
tier): studies move when old, come back after a read, every copy SHA-256-checked, and an
interrupted or refused move leaves everything readable; `verify` is clean after each step."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from config import Settings
from config.settings import ConfigError, StorageTier
from storage.archive import Archive, open_archive
from storage.blobs import BlobStore, BlobStream, S3BlobStore
from storage.errors import StorageUnavailable
from storage.index.models import Instance, Series, Study
from storage.ingest import ingest_file
from storage.tiers import (
    TIERS_LOCK,
    TieredBlobStore,
    apply_tiers,
    apply_tiers_periodically,
    marking_reads,
)
from storage.verify import verify_archive
from tests.conftest import make_settings, s3_blob_url
from tests.factories import ct_instance, ensure_partition, write_part10
from tests.server.dicomweb.conftest import multipart_parts, serve
from tests.server.test_cli import hilum_env
from tests.waiting import wait_until

COLD_AFTER_DAYS = 30


@pytest.fixture
def tiered(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    if settings.storage.database_url:
        cold_url = s3_blob_url(request.getfixturevalue("s3_server"))
    else:
        cold_url = f"file://{tmp_path / 'cold'}"
    tier = StorageTier(name="cold", blob_url=cold_url, after_days=COLD_AFTER_DAYS,
                       s3_access_key=settings.storage.s3_access_key,
                       s3_secret_key=settings.storage.s3_secret_key)  # fmt: skip
    storage = settings.storage.model_copy(update={"tiers": [tier]})
    return settings.model_copy(update={"storage": storage})


@pytest.fixture
def tiered_archive(tiered: Settings) -> Iterator[Archive]:
    archive = open_archive(tiered, migrate=True)
    try:
        yield archive
    finally:
        archive.close()


def _blobs(archive: Archive) -> TieredBlobStore:
    assert isinstance(archive.blobs, TieredBlobStore)
    return archive.blobs


def _study(archive: Archive, tmp_path: Path, count: int = 2) -> str:
    study, series = generate_uid(), generate_uid()
    for i in range(count):
        path = write_part10(ct_instance(study, series, seed=i), tmp_path / f"{study}-{i}.dcm")
        ingest_file(archive, path)
    return study


def _age(archive: Archive, study: str, days: int) -> None:
    """Arrange: the study's last instance arrived ``days`` ago."""
    with archive.index.write() as session:
        session.execute(
            update(Study)
            .where(Study.study_instance_uid == study)
            .values(last_instance_at=datetime.now(UTC) - timedelta(days=days))
        )


def _rows(archive: Archive, study: str) -> list[tuple[str, str, str]]:
    """(blob key, SHA-256, tier) of the study's instances."""
    with archive.index.read() as session:
        return list(
            session.execute(
                select(Instance.blob_key, Instance.sha256, Instance.tier)
                .join(Series, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .where(Study.study_instance_uid == study)
            )
        )


def _last_read(archive: Archive, study: str) -> object:
    with archive.index.read() as session:
        return session.scalar(select(Study.last_read_at).where(Study.study_instance_uid == study))


def _apply(archive: Archive, tiered: Settings) -> object:
    return apply_tiers(archive.index, _blobs(archive), tiered.storage.tiers, archive.partition,
                       tiered.server.data_dir / "tmp")  # fmt: skip


def test_an_old_study_moves_to_the_cold_tier_and_comes_back_after_a_read(
    tiered_archive: Archive, tiered: Settings, tmp_path: Path
) -> None:
    archive, blobs = tiered_archive, _blobs(tiered_archive)
    old, recent = _study(archive, tmp_path), _study(archive, tmp_path)
    _age(archive, old, COLD_AFTER_DAYS + 1)

    report = _apply(archive, tiered)

    assert report.moved == {("primary", "cold"): 2} and report.failed == []
    assert {tier for _, _, tier in _rows(archive, old)} == {"cold"}
    assert {tier for _, _, tier in _rows(archive, recent)} == {""}
    for key, sha, tier in _rows(archive, old):
        assert not blobs.primary.exists(key) and blobs.tiers["cold"].exists(key)
        with archive.blobs.open(key, tier=tier) as stream:  # read where the index says
            assert hashlib.sha256(stream.read()).hexdigest() == sha
    assert verify_archive(archive).ok
    assert _last_read(archive, old) is None  # checking the archive is not a client's read

    # A viewer opens the study: served from the cold tier, and the study is marked read.
    key, _sha, tier = _rows(archive, old)[0]
    assert len(marking_reads(archive).get_range(key, 0, 132, tier=tier)) == 132
    assert _last_read(archive, old) is not None

    back = _apply(archive, tiered)

    assert back.moved == {("cold", "primary"): 2}
    for key, _sha, tier in _rows(archive, old):
        assert tier == "" and blobs.primary.exists(key) and not blobs.tiers["cold"].exists(key)
    assert verify_archive(archive).ok
    assert _apply(archive, tiered).moved == {}  # nothing left to do


@pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)
def test_a_blob_that_fails_its_checksum_is_not_moved(
    tiered_archive: Archive, tiered: Settings, tmp_path: Path
) -> None:
    archive, blobs = tiered_archive, _blobs(tiered_archive)
    study = _study(archive, tmp_path)
    _age(archive, study, COLD_AFTER_DAYS + 1)
    key = _rows(archive, study)[0][0]
    damaged = tiered.server.data_dir / "blobs" / key
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x01")  # bit rot

    report = _apply(archive, tiered)

    assert report.moved == {}
    (failure,) = report.failed
    assert study in failure and "does not match the SHA-256 the index recorded" in failure
    assert {tier for _, _, tier in _rows(archive, study)} == {""}
    assert all(blobs.primary.exists(k) and not blobs.tiers["cold"].exists(k)
               for k, _, _ in _rows(archive, study))  # fmt: skip


@pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)
def test_a_move_that_fails_part_way_leaves_every_study_readable(
    tiered_archive: Archive, tiered: Settings, tmp_path: Path
) -> None:
    archive = tiered_archive
    first, second = _study(archive, tmp_path), _study(archive, tmp_path)
    for study in (first, second):
        _age(archive, study, COLD_AFTER_DAYS + 1)
    # The cold store cannot take the second study: a file where its folder would go.
    blocked = tmp_path / "cold" / Path(_rows(archive, second)[0][0]).parent.parent
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_bytes(b"")

    report = _apply(archive, tiered)

    assert report.moved == {("primary", "cold"): 2}
    (failure,) = report.failed
    assert second in failure
    assert {tier for _, _, tier in _rows(archive, second)} == {""}
    for study in (first, second):
        for key, sha, tier in _rows(archive, study):
            with archive.blobs.open(key, tier=tier) as stream:
                assert hashlib.sha256(stream.read()).hexdigest() == sha
    report = verify_archive(archive)
    assert (report.missing, report.mismatched) == ([], [])
    assert report.orphans == [str(blocked.relative_to(tmp_path / "cold"))]  # the test's blocker

    blocked.unlink()
    assert _apply(archive, tiered).moved == {("primary", "cold"): 2}
    assert {tier for _, _, tier in _rows(archive, second)} == {"cold"}
    assert verify_archive(archive).ok


def test_tiers_must_have_unique_names_and_increasing_ages(tmp_path: Path) -> None:
    cold = {"name": "cold", "blob_url": "file:///cold", "after_days": 30}
    with pytest.raises(ConfigError, match="unique"):
        make_settings(tmp_path, storage={"tiers": [cold, {**cold, "after_days": 90}]})
    with pytest.raises(ConfigError, match="increase"):
        make_settings(tmp_path, storage={"tiers": [cold, {**cold, "name": "x", "after_days": 7}]})


@pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)
def test_hilum_tiers_apply_then_verify(tiered: Settings, tmp_path: Path) -> None:
    archive = open_archive(tiered, migrate=True)
    try:
        study = _study(archive, tmp_path)
        _age(archive, study, COLD_AFTER_DAYS + 1)
    finally:
        archive.close()
    env = {
        **os.environ,
        "HILUM_SERVER__DATA_DIR": str(tiered.server.data_dir),
        "HILUM_STORAGE__TIERS": json.dumps([t.model_dump() for t in tiered.storage.tiers]),
    }

    def hilum(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    applied = hilum("tiers", "apply")
    assert applied.returncode == 0, applied.stderr
    assert "moved 2 instances from primary to cold" in applied.stdout
    verified = hilum("verify")
    assert verified.returncode == 0, verified.stdout
    assert "2 instances checked: 0 missing blobs, 0 checksum mismatches, 0 orphan blobs" in (
        verified.stdout
    )


@pytest.mark.parametrize("backend", ["postgresql-s3"], indirect=True)
def test_an_s3_tier_writes_its_objects_in_its_storage_class(
    settings: Settings, tmp_path: Path, s3_server: object
) -> None:
    tier = StorageTier(name="cold", blob_url=s3_blob_url(s3_server), after_days=COLD_AFTER_DAYS,
                       s3_access_key=settings.storage.s3_access_key,
                       s3_secret_key=settings.storage.s3_secret_key,
                       s3_storage_class="STANDARD_IA")  # fmt: skip
    tiered = settings.model_copy(
        update={"storage": settings.storage.model_copy(update={"tiers": [tier]})}
    )
    archive = open_archive(tiered, migrate=True)
    try:
        study = _study(archive, tmp_path)
        _age(archive, study, COLD_AFTER_DAYS + 1)
        assert _apply(archive, tiered).moved == {("primary", "cold"): 2}
        cold = _blobs(archive).tiers["cold"]
        primary = _blobs(archive).primary
        assert isinstance(cold, S3BlobStore) and isinstance(primary, S3BlobStore)
        keys = {key for key, _, _ in _rows(archive, study)}
        # What the S3 server reports, in a listing and in each object's headers.
        listed = {
            o.object_name: o.storage_class
            for o in cold.client.list_objects(cold.bucket, recursive=True)
        }
        assert {listed[key] for key in keys} == {"STANDARD_IA"}
        for key in keys:
            headers = cold.client.stat_object(cold.bucket, key).metadata
            assert headers is not None and headers.get("x-amz-storage-class") == "STANDARD_IA"
        assert verify_archive(archive).ok

        # A read brings the study back to the primary store, in its bucket's default class.
        marking_reads(archive).get_range(next(iter(keys)), 0, 132, tier="cold")
        assert _apply(archive, tiered).moved == {("cold", "primary"): 2}
        for key in keys:
            headers = primary.client.stat_object(primary.bucket, key).metadata
            assert headers is not None
            assert headers.get("x-amz-storage-class", "STANDARD") == "STANDARD"
        assert verify_archive(archive).ok
    finally:
        archive.close()


def test_a_tier_storage_class_must_be_one_read_at_once_and_on_s3(tmp_path: Path) -> None:
    s3 = {"name": "cold", "blob_url": "s3://cold?endpoint=http://127.0.0.1:9", "after_days": 30}
    ia = {**s3, "s3_storage_class": "ONEZONE_IA"}
    settings = make_settings(tmp_path, storage={"tiers": [ia]})
    assert settings.storage.tiers[0].s3_storage_class == "ONEZONE_IA"
    with pytest.raises(ConfigError, match="archival storage class: its objects cannot be read"):
        make_settings(tmp_path, storage={"tiers": [{**s3, "s3_storage_class": "GLACIER"}]})
    with pytest.raises(ConfigError, match="not an S3 storage class Hilum knows"):
        make_settings(tmp_path, storage={"tiers": [{**s3, "s3_storage_class": "cheap"}]})
    with pytest.raises(ConfigError, match="s3_storage_class is for S3 tiers"):
        make_settings(
            tmp_path,
            storage={"tiers": [{**s3, "blob_url": "file:///cold", "s3_storage_class": "STANDARD"}]},
        )


@pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)
def test_the_periodic_run_moves_every_partitions_studies_out_and_back(
    tiered_archive: Archive, tiered: Settings, tmp_path: Path
) -> None:
    archive = tiered_archive
    ensure_partition(archive.index, "research")
    studies = [_study(archive, tmp_path), _study(archive.scoped("research"), tmp_path)]
    for study in studies:
        _age(archive, study, COLD_AFTER_DAYS + 1)
    stop = threading.Event()
    # What `hilum worker` runs in a thread ([storage] tiers_interval_h), every 0.2 s here.
    args = (archive, tiered.storage.tiers, tmp_path / "tmp", 0.2, stop)
    mover = threading.Thread(target=apply_tiers_periodically, args=args)
    mover.start()
    try:

        def tiers() -> set[str]:
            return {tier for study in studies for _, _, tier in _rows(archive, study)}

        wait_until(lambda: tiers() == {"cold"}, "both partitions' studies in the cold tier", 60)
        assert verify_archive(archive).ok
        for study in studies:  # a viewer opens each: back at the next run
            key, _sha, tier = _rows(archive, study)[0]
            marking_reads(archive).get_range(key, 0, 132, tier=tier)
        wait_until(lambda: tiers() == {""}, "both studies back in the primary store", 60)
    finally:
        stop.set()
        mover.join(60)
    assert not mover.is_alive()
    assert verify_archive(archive).ok


@pytest.mark.parametrize("backend", ["postgresql-s3"], indirect=True)
def test_workers_take_turns_at_the_periodic_moves(
    tiered_archive: Archive, tiered: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another worker's run (its lock, on its own connection to the index): this one skips
    its turns and copies nothing; once that one is done, it moves the study."""
    archive = tiered_archive
    study = _study(archive, tmp_path)
    _age(archive, study, COLD_AFTER_DAYS + 1)
    caplog.set_level(logging.INFO, logger="storage.tiers")
    stop = threading.Event()
    args = (archive, tiered.storage.tiers, tmp_path / "tmp", 0.2, stop)
    mover = threading.Thread(target=apply_tiers_periodically, args=args)
    other = open_archive(tiered)
    try:
        with other.index.alone(TIERS_LOCK) as held:
            assert held
            mover.start()
            wait_until(
                lambda: "another process is moving studies" in caplog.text,
                "this worker to skip its turn",
                60,
            )
            assert {tier for _, _, tier in _rows(archive, study)} == {""}
        wait_until(
            lambda: {tier for _, _, tier in _rows(archive, study)} == {"cold"},
            "the study moved once the other run is done",
            60,
        )
    finally:
        stop.set()
        other.close()
        if mover.is_alive():
            mover.join(60)
    assert verify_archive(archive).ok


class Killed(BaseException):
    """The process killed at that point: nothing in Hilum handles it, as nothing runs after a
    kill (a BaseException, like KeyboardInterrupt)."""


class KilledAt:
    """A real blob store (a :class:`BlobStore` by delegation, given to ``TieredBlobStore``'s
    constructor) that kills the run at one step of a move: once it has stored ``puts`` blobs
    (every copy made and read back: the next step is the index update), or at its first
    delete (the index updated: the next step deletes the source)."""

    def __init__(self, store: BlobStore, *, puts: int | None = None, delete: bool = False):
        self.store, self.puts, self.kill_at_delete = store, puts, delete
        self.stored = 0

    def put(self, key: str, path: Path, *, may_link: bool = False) -> None:
        self.store.put(key, path, may_link=may_link)
        self.stored += 1

    def open(self, key: str, *, tier: str = "") -> BlobStream:
        stream = self.store.open(key, tier=tier)
        if self.puts is not None and self.stored >= self.puts:
            stream.read()  # the last copy read back and checked, then the kill
            stream.close()
            raise Killed
        return stream

    def delete(self, key: str) -> None:
        if self.kill_at_delete:
            raise Killed
        self.store.delete(key)

    def exists(self, key: str) -> bool:
        return self.store.exists(key)


def _assert_readable_and_verified(archive: Archive, study: str) -> None:
    for key, sha, tier in _rows(archive, study):
        with archive.blobs.open(key, tier=tier) as stream:
            assert hashlib.sha256(stream.read()).hexdigest() == sha
    assert verify_archive(archive).ok


def test_a_run_killed_between_the_copy_and_the_index_update_is_completed_by_the_next(
    tiered_archive: Archive, tiered: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive, blobs = tiered_archive, _blobs(tiered_archive)
    study = _study(archive, tmp_path)
    _age(archive, study, COLD_AFTER_DAYS + 1)
    keys = [key for key, _, _ in _rows(archive, study)]
    killing = TieredBlobStore(blobs.primary, {"cold": KilledAt(blobs.tiers["cold"], puts=2)})

    with pytest.raises(Killed):
        apply_tiers(archive.index, killing, tiered.storage.tiers, archive.partition,
                    tmp_path / "tmp")  # fmt: skip

    # Both copies made, the index not updated: read from the primary store, as it says.
    assert {tier for _, _, tier in _rows(archive, study)} == {""}
    assert all(blobs.primary.exists(k) and blobs.tiers["cold"].exists(k) for k in keys)
    caplog.set_level(logging.WARNING, logger="storage.tiers")
    _assert_readable_and_verified(archive, study)
    assert "where the index says" not in caplog.text  # no read missed its store

    report = _apply(archive, tiered)

    assert report.moved == {("primary", "cold"): 2} and report.failed == []
    assert {tier for _, _, tier in _rows(archive, study)} == {"cold"}
    assert not any(blobs.primary.exists(k) for k in keys)
    _assert_readable_and_verified(archive, study)
    assert "where the index says" not in caplog.text


def test_a_run_killed_between_the_index_update_and_the_delete_is_completed_by_the_next(
    tiered_archive: Archive, tiered: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive, blobs = tiered_archive, _blobs(tiered_archive)
    study = _study(archive, tmp_path)
    _age(archive, study, COLD_AFTER_DAYS + 1)
    keys = [key for key, _, _ in _rows(archive, study)]
    killing = TieredBlobStore(KilledAt(blobs.primary, delete=True), blobs.tiers)

    with pytest.raises(Killed):
        apply_tiers(archive.index, killing, tiered.storage.tiers, archive.partition,
                    tmp_path / "tmp")  # fmt: skip

    # The index points at the cold copies; the primary copies are still there, and recorded.
    assert {tier for _, _, tier in _rows(archive, study)} == {"cold"}
    assert all(blobs.primary.exists(k) and blobs.tiers["cold"].exists(k) for k in keys)
    with archive.index.read() as session:
        assert set(session.scalars(select(Instance.tier_copy).where(Instance.blob_key.in_(keys))))\
            == {""}  # fmt: skip
    caplog.set_level(logging.WARNING, logger="storage.tiers")
    _assert_readable_and_verified(archive, study)
    assert "where the index says" not in caplog.text

    report = _apply(archive, tiered)

    assert report.moved == {} and report.failed == [] and report.leftovers_deleted == 2
    assert not any(blobs.primary.exists(k) for k in keys)
    assert all(blobs.tiers["cold"].exists(k) for k in keys)
    with archive.index.read() as session:
        assert set(session.scalars(select(Instance.tier_copy).where(Instance.blob_key.in_(keys))))\
            == {None}  # fmt: skip
    _assert_readable_and_verified(archive, study)
    assert _apply(archive, tiered).leftovers_deleted == 0  # done once


def test_a_read_goes_to_the_tier_the_index_names_and_probes_only_when_the_copy_is_not_there(
    tiered_archive: Archive, tiered: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive = tiered_archive
    study = _study(archive, tmp_path)
    _age(archive, study, COLD_AFTER_DAYS + 1)
    _apply(archive, tiered)
    (key, sha, tier), _ = _rows(archive, study)
    assert tier == "cold"
    caplog.set_level(logging.WARNING, logger="storage.tiers")

    with archive.blobs.open(key, tier="cold") as stream:
        assert hashlib.sha256(stream.read()).hexdigest() == sha
    assert caplog.text == ""
    # A row read before a move repointed it: the primary copy is gone; found, and logged.
    with archive.blobs.open(key, tier="") as stream:
        assert hashlib.sha256(stream.read()).hexdigest() == sha
    assert (f"blob {key} is not in the primary blob store, where the index says it is; read "
            "from storage tier 'cold' instead") in caplog.text  # fmt: skip


def test_a_tier_in_the_index_but_not_in_the_configuration_is_named_in_the_error(
    tiered_archive: Archive,
    tiered: Settings,
    settings: Settings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    archive = tiered_archive
    study = _study(archive, tmp_path)
    _age(archive, study, COLD_AFTER_DAYS + 1)
    _apply(archive, tiered)
    key, _sha, tier = _rows(archive, study)[0]
    renamed = tiered.storage.tiers[0].model_copy(update={"name": "archive"})
    for configured in ([], [renamed]):  # the tier removed, or renamed
        storage = settings.storage.model_copy(update={"tiers": configured})
        reconfigured = settings.model_copy(update={"storage": storage})
        other = open_archive(reconfigured)
        try:
            expected = (f"blob {key} is in storage tier 'cold' according to the index, but no "
                        "tier of that name is configured")  # fmt: skip
            with pytest.raises(StorageUnavailable) as raised:
                other.blobs.open(key, tier=tier)
            assert expected in str(raised.value)
            with pytest.raises(StorageUnavailable, match="put the tier back in the configuration"):
                other.blobs.get_range(key, 0, 132, tier=tier)
            with pytest.raises(StorageUnavailable, match="storage tier 'cold'"):
                verify_archive(other)
            # A viewer's retrieve: 503, and what the administrator needs, in the log too.
            server = serve(reconfigured, other)
            try:
                with caplog.at_level(logging.WARNING, logger="server.app"):
                    response = requests.get(
                        f"http://127.0.0.1:{server.port}/dicomweb/studies/{study}", timeout=60
                    )
            finally:
                server.stop()
            assert response.status_code == 503
            assert expected in response.json()["error"] and expected in caplog.text
        finally:
            other.close()


def test_a_cold_study_opened_over_wado_rs_comes_back_to_the_primary_store(
    tiered_archive: Archive, tiered: Settings, tmp_path: Path
) -> None:
    """A viewer's WADO-RS retrieve, over HTTP through the app (its own archive, as `hilum
    serve` gives it): served from the cold tier, the study marked read, back at the next run."""
    archive, blobs = tiered_archive, _blobs(tiered_archive)
    study = _study(archive, tmp_path)
    _age(archive, study, COLD_AFTER_DAYS + 1)
    assert _apply(archive, tiered).moved == {("primary", "cold"): 2}
    recorded = {sha for _, sha, _ in _rows(archive, study)}
    web = open_archive(tiered)
    server = serve(tiered, web)
    try:

        def retrieve() -> set[str]:
            response = requests.get(
                f"http://127.0.0.1:{server.port}/dicomweb/studies/{study}",
                headers={
                    "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'
                },  # fmt: skip
                timeout=60,
            )
            assert response.status_code == 200, response.text
            return {hashlib.sha256(body).hexdigest() for _, body in multipart_parts(response)}

        assert retrieve() == recorded  # the stored files, byte for byte, from the cold tier
        assert _last_read(archive, study) is not None

        assert _apply(archive, tiered).moved == {("cold", "primary"): 2}
        for key, _sha, tier in _rows(archive, study):
            assert tier == "" and blobs.primary.exists(key) and not blobs.tiers["cold"].exists(key)
        assert verify_archive(archive).ok
        assert retrieve() == recorded  # and from the primary store
    finally:
        server.stop()
        web.close()


@pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)
def test_a_restore_puts_every_blob_in_the_primary_store_and_the_index_says_so(
    tiered: Settings, tmp_path: Path
) -> None:
    archive = open_archive(tiered, migrate=True)
    try:
        cold, warm = _study(archive, tmp_path), _study(archive, tmp_path)
        _age(archive, cold, COLD_AFTER_DAYS + 1)
        assert _apply(archive, tiered).moved == {("primary", "cold"): 2}
    finally:
        archive.close()
    env = {**os.environ, "HILUM_SERVER__DATA_DIR": str(tiered.server.data_dir)}
    tiers = json.dumps([t.model_dump() for t in tiered.storage.tiers])

    def hilum(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server.cli", *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    backup = tmp_path / "backup"
    made = hilum("backup", str(backup), HILUM_STORAGE__TIERS=tiers)
    assert made.returncode == 0, made.stderr
    shutil.rmtree(tiered.server.data_dir)  # the disks are lost, the cold one too
    shutil.rmtree(tmp_path / "cold")

    restored = hilum("restore", str(backup))  # onto a site without the cold tier

    assert restored.returncode == 0, restored.stderr
    assert "4 instances, 0 missing blobs, 0 checksum mismatches, 0 orphan blobs" in (
        restored.stdout
    )
    plain = open_archive(tiered.model_copy(update={"storage": tiered.storage.model_copy(
        update={"tiers": []})}))  # fmt: skip
    try:
        for study in (cold, warm):
            assert {tier for _, _, tier in _rows(plain, study)} == {""}
            _assert_readable_and_verified(plain, study)
    finally:
        plain.close()


@pytest.mark.parametrize("backend", ["postgresql-s3"], indirect=True)
def test_hilum_tiers_apply_waits_its_turn_behind_a_workers_run(
    tiered_archive: Archive, tiered: Settings, tmp_path: Path
) -> None:
    """A manual run while a worker's periodic run holds the lock copies nothing and says so;
    once the worker's run is done, it moves the study."""
    archive = tiered_archive
    study = _study(archive, tmp_path)
    _age(archive, study, COLD_AFTER_DAYS + 1)
    env = hilum_env(tiered, HILUM_STORAGE__TIERS=json.dumps(
        [t.model_dump() for t in tiered.storage.tiers]))  # fmt: skip

    def apply() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server.cli", "tiers", "apply"], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    worker = open_archive(tiered)
    try:
        with worker.index.alone(TIERS_LOCK) as held:
            assert held
            refused = apply()
            assert refused.returncode == 1
            assert "another process" in refused.stderr and "try again" in refused.stderr
            assert {tier for _, _, tier in _rows(archive, study)} == {""}
    finally:
        worker.close()
    applied = apply()
    assert applied.returncode == 0, applied.stderr
    assert "moved 2 instances from primary to cold" in applied.stdout
    assert {tier for _, _, tier in _rows(archive, study)} == {"cold"}
    assert verify_archive(archive).ok
