"""DICOMweb served by the real processes: ``hilum web`` (gunicorn) and ``hilum serve``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dicomweb_client.api import DICOMwebClient

from config import Settings
from storage.archive import Archive
from tests.factories import data_set_differences
from tests.hilum_process import running_hilum
from tests.server.dicomweb.conftest import ct_series


def _running(command: str, settings: Settings) -> Iterator[DICOMwebClient]:
    with running_hilum(command, settings) as hilum:
        yield DICOMwebClient(hilum.base_url)


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
