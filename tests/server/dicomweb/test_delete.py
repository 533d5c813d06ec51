"""DELETE of a study, a series or an instance: index rows and blobs go, the rest stays."""

from __future__ import annotations

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from storage.archive import Archive
from storage.query import Query, QueryLevel, locate_instances
from tests.server.dicomweb.conftest import ct_series


def blob_keys(archive: Archive, study: str) -> list[str]:
    query = Query(QueryLevel.STUDY, {"StudyInstanceUID": study})
    return [i.blob_key for i in locate_instances(archive, query)]


def test_delete_instance_series_and_study(client: DICOMwebClient, archive: Archive) -> None:
    ct = ct_series(2)
    study = ct[0].StudyInstanceUID
    mr = ct_series(1, study, modality="MR")
    client.store_instances(ct + mr)
    keys = blob_keys(archive, study)
    assert len(keys) == 3

    client.delete_instance(study, ct[0].SeriesInstanceUID, ct[0].SOPInstanceUID)
    assert len(blob_keys(archive, study)) == 2
    assert sum(archive.blobs.exists(k) for k in keys) == 2

    client.delete_series(study, mr[0].SeriesInstanceUID)
    (remaining,) = client.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert remaining["00080061"]["Value"] == ["CT"]  # ModalitiesInStudy follows the series
    assert len(client.search_for_series(study)) == 1

    client.delete_study(study)
    assert client.search_for_studies(search_filters={"StudyInstanceUID": study}) == []
    assert not any(archive.blobs.exists(k) for k in keys)


def test_delete_unknown_is_404(base_url: str) -> None:
    response = requests.delete(f"{base_url}/studies/{generate_uid()}", timeout=30)
    assert response.status_code == 404
    assert requests.delete(f"{base_url}/studies/x.y", timeout=30).status_code == 400
