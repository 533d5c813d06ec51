"""DICOMweb served by the real processes: ``hilum web`` (gunicorn) and ``hilum serve``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from dicomweb_client.api import DICOMwebClient

from config import Settings
from storage.archive import Archive
from tests.conftest import free_port
from tests.factories import data_set_differences
from tests.server.dicomweb.conftest import ct_series


def _env(settings: Settings, http_port: int) -> dict[str, str]:
    s = settings.storage
    return {
        **os.environ,
        "HILUM_SERVER__DATA_DIR": str(settings.server.data_dir),
        "HILUM_DIMSE__PORT": str(settings.dimse.port),
        "HILUM_HTTP__PORT": str(http_port),
        "HILUM_HTTP__WORKERS": "2",
        "HILUM_HTTP__THREADS": "2",
        "HILUM_INFERENCE__SERVE_WORKER": "false",
        "HILUM_STORAGE__DATABASE_URL": s.database_url,
        "HILUM_STORAGE__BLOB_URL": s.blob_url,
        "HILUM_STORAGE__S3_ACCESS_KEY": s.s3_access_key,
        "HILUM_STORAGE__S3_SECRET_KEY": s.s3_secret_key,
    }


def _running(command: str, settings: Settings) -> Iterator[DICOMwebClient]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", command], env=_env(settings, port),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        if "Hilum is listening" not in banner:
            process.kill()
            pytest.fail(f"hilum {command} did not start: {process.communicate()[1][-3000:]}")
        assert f"http://127.0.0.1:{port}/dicomweb" in banner
        yield DICOMwebClient(f"http://127.0.0.1:{port}/dicomweb")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""


@pytest.fixture
def web(settings: Settings, archive: Archive) -> Iterator[DICOMwebClient]:
    # `archive` migrated the index, as `hilum db upgrade` would have.
    yield from _running("web", settings)


def test_hilum_web_stores_searches_and_retrieves(web: DICOMwebClient) -> None:
    instances = ct_series(3)
    study = instances[0].StudyInstanceUID
    response = web.store_instances(instances)
    assert len(response.ReferencedSOPSequence) == 3

    (found,) = web.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert found["00201208"]["Value"] == [3]  # NumberOfStudyRelatedInstances
    received = {ds.SOPInstanceUID: ds for ds in web.retrieve_study(study)}
    for ds in instances:
        assert data_set_differences(ds, received[ds.SOPInstanceUID]) == []
    metadata = web.retrieve_series_metadata(study, instances[0].SeriesInstanceUID)
    assert len(metadata) == 3


def test_hilum_serve_serves_dicomweb_beside_dimse(settings: Settings) -> None:
    for client in _running("serve", settings):
        (ds,) = ct_series(1)
        client.store_instances([ds])
        assert len(client.search_for_instances(study_instance_uid=ds.StudyInstanceUID)) == 1
