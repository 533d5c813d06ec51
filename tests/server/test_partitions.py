"""Partitions over HTTP: ``/dicomweb`` (the default partition) and
``/partitions/{name}/dicomweb`` are separate archives to QIDO-RS, WADO-RS (metadata, frames,
rendered), STOW-RS, DELETE, WADO-URI, the jobs API and the UI pages; dicomweb-client against a
real server. Data stored in one partition is never visible from the other; an unknown
partition, and one the principal is not bound to, is a 404."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from flask import Flask
from sqlalchemy import delete

from config import Settings
from server.app import HttpServer, create_app
from server.context import UNAUTHENTICATED, Principal
from server.partitions import KnownPartitions, may_enter
from storage.accounts import Accounts
from storage.archive import Archive, open_archive
from storage.index.models import Partition as PartitionRow
from storage.ingest import Origin, ingest_file
from storage.query import Query, QueryLevel, locate_instances
from tests.conftest import free_port, make_settings, s3_blob_url
from tests.factories import ensure_partition, write_part10
from tests.server.dicomweb.conftest import ct_series

HOSPITAL = "hospital_a"
ROOT = f"/partitions/{HOSPITAL}"
FRAME_TYPE = "multipart/related; type=application/octet-stream; transfer-syntax=*"


@pytest.fixture
def backend() -> str:
    """sqlite-files here; the PostgreSQL + S3 case is its own test below."""
    return "sqlite-files"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"http": settings.http.model_copy(update={"allow_delete": True})}
    )


class Site:
    """A running Hilum with the default partition and ``hospital_a``."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.server = HttpServer(app, "127.0.0.1", free_port())
        self.url = f"http://127.0.0.1:{self.server.port}"

    def root(self, partition: str | None) -> str:
        return self.url if partition is None else f"{self.url}/partitions/{partition}"

    def dicomweb(self, partition: str | None) -> DICOMwebClient:
        return DICOMwebClient(self.root(partition) + "/dicomweb")


@pytest.fixture
def site(settings: Settings, archive: Archive) -> Iterator[Site]:
    ensure_partition(archive.index, HOSPITAL)
    site = Site(create_app(settings, archive))
    site.server.start()
    try:
        yield site
    finally:
        site.server.stop()


def test_the_decision_a_partition_exists_and_the_principal_may_see_it() -> None:
    exists = {"default", HOSPITAL, "hospital_b"}.__contains__
    bound = Principal("user", "radiologist", frozenset({"radiologist"}), frozenset({HOSPITAL}))
    assert may_enter(UNAUTHENTICATED, HOSPITAL, exists)
    assert may_enter(UNAUTHENTICATED, "default", exists)
    assert not may_enter(UNAUTHENTICATED, "nowhere", exists)
    assert may_enter(bound, HOSPITAL, exists)
    assert not may_enter(bound, "hospital_b", exists)
    assert not may_enter(bound, "default", exists)  # bound to partitions: not the default one
    assert not may_enter(bound, "nowhere", exists)
    # For a partition it may not see, whether it exists is not even asked.
    asked: list[str] = []
    may_enter(bound, "hospital_b", lambda name: asked.append(name) is None)
    assert asked == []


def test_a_found_partition_is_remembered_for_a_while_a_missing_one_never(
    archive: Archive,
) -> None:
    now = [0.0]
    known = KnownPartitions(archive.index, ttl_s=30.0, clock=lambda: now[0])
    assert "hospital_c" not in known
    ensure_partition(archive.index, "hospital_c")
    assert "hospital_c" in known  # a new partition answers at once
    with archive.index.write() as session:  # gone (no command removes one yet)
        session.execute(delete(PartitionRow).where(PartitionRow.name == "hospital_c"))
    now[0] = 29.0
    assert "hospital_c" in known  # remembered
    now[0] = 31.0
    assert "hospital_c" not in known  # looked up again


def _isolated(site: Site, archive: Archive) -> None:
    """The checks of both backend pairs: one study in each partition, each invisible from the
    other over QIDO-RS, WADO-RS, WADO-URI, DELETE, STOW-RS, the jobs API and the pages."""
    hospital, default = site.dicomweb(HOSPITAL), site.dicomweb(None)
    ours, theirs = ct_series(2), ct_series(1)
    study, series, sop = ours[0].StudyInstanceUID, ours[0].SeriesInstanceUID, ours[0].SOPInstanceUID
    other_study = theirs[0].StudyInstanceUID
    hospital.store_instances(ours)
    default.store_instances(theirs)

    # QIDO-RS: each root finds its own study only.
    assert [s["0020000D"]["Value"][0] for s in hospital.search_for_studies()] == [study]
    assert [s["0020000D"]["Value"][0] for s in default.search_for_studies()] == [other_study]
    assert default.search_for_series(search_filters={"StudyInstanceUID": study}) == []
    assert default.search_for_instances(search_filters={"SOPInstanceUID": sop}) == []
    # RetrieveURL and BulkDataURI point at the root the request used.
    (found,) = hospital.search_for_studies()
    # (dicomweb-client sends a Host header without the port: compare the paths.)
    assert _path(found["00081190"]["Value"][0]) == f"{ROOT}/dicomweb/studies/{study}"
    metadata = hospital.retrieve_instance_metadata(study, series, sop)
    assert _path(metadata["7FE00010"]["BulkDataURI"]).startswith(
        f"{ROOT}/dicomweb/studies/{study}/series/{series}/instances/{sop}/bulkdata/"
    )

    # WADO-RS: metadata, instance, frames, rendered from the own root; 404 from the other.
    assert len(hospital.retrieve_study_metadata(study)) == 2
    assert hospital.retrieve_instance_frames(study, series, sop, [1])
    assert hospital.retrieve_instance_rendered(study, series, sop, media_types=("image/png",))
    base = f"{site.root(None)}/dicomweb/studies/{study}"
    instance = f"{base}/series/{series}/instances/{sop}"
    for url, accept in [
        (f"{base}/metadata", "application/dicom+json"),
        (base, 'multipart/related; type="application/dicom"'),
        (f"{instance}/frames/1", FRAME_TYPE),
        (f"{instance}/rendered", "image/png"),
        (f"{base}/thumbnail", "image/png"),
    ]:
        assert requests.get(url, headers={"Accept": accept}, timeout=30).status_code == 404, url

    # WADO-URI, from each root.
    params = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop}
    params["contentType"] = "application/dicom"
    assert requests.get(f"{site.root(HOSPITAL)}/wado", params=params, timeout=30).ok
    assert requests.get(f"{site.root(None)}/wado", params=params, timeout=30).status_code == 404

    # DELETE: the other root cannot delete it; its own can.
    assert requests.delete(base, timeout=30).status_code == 404
    assert len(hospital.retrieve_study_metadata(study)) == 2
    hospital.delete_instance(study, series, ours[1].SOPInstanceUID)
    assert len(hospital.retrieve_study_metadata(study)) == 1
    assert [s["0020000D"]["Value"][0] for s in default.search_for_studies()] == [other_study]

    # The same instance stored in both partitions: two instances, two blobs.
    default.store_instances([ours[0]])
    keys = {
        name: [i.blob_key for i in locate_instances(archive.scoped(name), _study_query(study))]
        for name in ("default", HOSPITAL)
    }
    assert len(keys["default"]) == len(keys[HOSPITAL]) == 1
    assert keys["default"] != keys[HOSPITAL]
    default.delete_study(study)
    assert len(hospital.retrieve_study_metadata(study)) == 1
    assert archive.blobs.exists(keys[HOSPITAL][0])

    # The jobs API: the study's jobs and findings in its partition only.
    jobs = f"{site.root(None)}/api/studies/{study}/jobs"
    assert requests.get(jobs, timeout=30).json() == []
    hospital_jobs = requests.get(f"{site.root(HOSPITAL)}/api/jobs", timeout=30)
    assert hospital_jobs.status_code == 200
    run = requests.post(
        f"{site.root(None)}/api/studies/{study}/jobs",
        json={"model": "ct_lesion_synthetic"},
        timeout=30,
    )
    assert run.status_code == 404  # no such study in the default partition
    run = requests.post(
        f"{site.root(HOSPITAL)}/api/studies/{study}/jobs",
        json={"model": "ct_lesion_synthetic"},
        timeout=30,
    )
    assert run.status_code == 202
    (job,) = run.json()
    assert requests.get(f"{site.root(None)}/api/jobs/{job['id']}", timeout=30).status_code == 404
    assert requests.get(f"{site.root(HOSPITAL)}/api/jobs/{job['id']}", timeout=30).ok
    assert [j["id"] for j in requests.get(f"{site.root(None)}/api/jobs", timeout=30).json()] == []
    listed = requests.get(f"{site.root(HOSPITAL)}/api/jobs", timeout=30).json()
    assert [j["id"] for j in listed] == [job["id"]]

    # The UI: the worklist and the study page of each partition.
    page = requests.get(f"{site.root(HOSPITAL)}/", timeout=30)
    assert page.ok and study in page.text and other_study not in page.text
    assert f'href="/partitions/{HOSPITAL}/studies/{study}"' in page.text
    page = requests.get(f"{site.root(None)}/", timeout=30)
    assert page.ok and other_study in page.text and study not in page.text
    assert requests.get(f"{site.root(HOSPITAL)}/studies/{study}", timeout=30).ok
    assert requests.get(f"{site.root(None)}/studies/{study}", timeout=30).status_code == 404
    assert requests.get(f"{site.root(HOSPITAL)}/studies/{other_study}", timeout=30).status_code == (
        404
    )

    # An unknown partition is a 404 on every family of routes.
    for path in ("/dicomweb/studies", "/wado", "/api/jobs", "/", "/jobs", "/upload"):
        assert requests.get(site.root("nowhere") + path, timeout=30).status_code == 404, path


def _path(url: str) -> str:
    return urlsplit(url).path


def _study_query(study: str) -> Query:
    return Query(QueryLevel.STUDY, {"StudyInstanceUID": study})


def test_each_partition_is_its_own_archive_over_http(site: Site, archive: Archive) -> None:
    _isolated(site, archive)


def test_each_partition_is_its_own_archive_on_postgresql_and_s3(
    tmp_path: Path, postgres_url: str, s3_server: object
) -> None:
    settings = make_settings(
        tmp_path,
        database_url=postgres_url,
        blob_url=s3_blob_url(s3_server),  # type: ignore[arg-type]
        http={"allow_delete": True},
    )
    archive = open_archive(settings, migrate=True)
    ensure_partition(archive.index, HOSPITAL)
    site = Site(create_app(settings, archive))
    site.server.start()
    try:
        _isolated(site, archive)
    finally:
        site.server.stop()
        archive.close()


def test_a_user_bound_to_a_partition_sees_only_that_partition(tmp_path: Path) -> None:
    """A radiologist's token bound to ``hospital_a`` (``hilum users add --partition``): every
    other partition, the default one included, is a 404 on DICOMweb, the JSON API and the
    pages, as if it did not exist; its own partition answers."""
    settings = make_settings(tmp_path / "auth", auth={"enabled": True})
    archive = open_archive(settings, migrate=True)
    for partition in (HOSPITAL, "hospital_b"):
        ensure_partition(archive.index, partition)
    elsewhere = ct_series(1)
    study, series, sop = (
        elsewhere[0].get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    for partition in ("default", "hospital_b"):
        path = write_part10(elsewhere[0], tmp_path / f"{partition}.dcm")
        ingest_file(archive.scoped(partition), path, Origin("CT01"))
    accounts = Accounts(archive.index)
    accounts.add_account("dr-a", "radiologist", [HOSPITAL])
    token = accounts.create_token("dr-a", expires_days=1)[1]
    bearer = {"Authorization": f"Bearer {token}"}
    site = Site(create_app(settings, archive))
    site.server.start()
    try:
        for partition in (None, "hospital_b"):
            for path in (
                "/dicomweb/studies",
                f"/dicomweb/studies/{study}/metadata",
                f"/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={sop}",
                "/api/jobs",
                f"/api/studies/{study}/jobs",
                "/",
                f"/studies/{study}",
                "/jobs",
            ):
                response = requests.get(site.root(partition) + path, headers=bearer, timeout=30)
                assert response.status_code == 404, (partition, path)
        client = DICOMwebClient(site.root(HOSPITAL) + "/dicomweb", headers=bearer)
        assert client.search_for_studies() == []
        assert requests.get(site.root(HOSPITAL) + "/", headers=bearer, timeout=30).ok
        jobs = requests.get(site.root(HOSPITAL) + "/api/jobs", headers=bearer, timeout=30)
        assert jobs.json() == []
    finally:
        site.server.stop()
        archive.close()


def test_stow_rs_into_a_partition_stores_there(site: Site, archive: Archive) -> None:
    ours = ct_series(1)
    response = site.dicomweb(HOSPITAL).store_instances(ours)
    study = ours[0].StudyInstanceUID
    # The stored instance's RetrieveURL is the partition's.
    (item,) = response.ReferencedSOPSequence
    assert _path(item.RetrieveURL).startswith(f"{ROOT}/dicomweb/studies/{study}/series/")
    assert list(locate_instances(archive, _study_query(study))) == []
    (stored,) = locate_instances(archive.scoped(HOSPITAL), _study_query(study))
    assert stored.sop_instance_uid == ours[0].SOPInstanceUID
