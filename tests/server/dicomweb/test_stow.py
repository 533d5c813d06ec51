"""STOW-RS (PS3.18 10.5): stores through the one ingest path; statuses 200, 202, 409, 413, 415."""

from __future__ import annotations

from io import BytesIO

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from config import Settings
from server.app import HttpServer, create_app
from server.dicomweb import stow
from storage.archive import Archive
from storage.audit import AuditEvent, AuditSearch, search_records
from storage.query import Query, QueryLevel, locate_instances
from tests.conftest import free_port
from tests.server.dicomweb.conftest import ct_series, serve

BOUNDARY = "hilum-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def part10(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def multipart(parts: list[bytes], content_type: str = "application/dicom") -> bytes:
    body = b"preamble, ignored\r\n"
    for part in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + part + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def stored_uids(archive: Archive, study: str) -> set[str]:
    query = Query(QueryLevel.STUDY, {"StudyInstanceUID": study})
    return {i.sop_instance_uid for i in locate_instances(archive, query)}


def test_store_instances_with_dicomweb_client(client: DICOMwebClient, archive: Archive) -> None:
    instances = ct_series(3)
    study = instances[0].StudyInstanceUID

    response = client.store_instances(instances)

    referenced = response.ReferencedSOPSequence
    assert [item.ReferencedSOPInstanceUID for item in referenced] == [
        ds.SOPInstanceUID for ds in instances
    ]
    assert referenced[0].RetrieveURL.endswith(
        f"/studies/{study}/series/{instances[0].SeriesInstanceUID}"
        f"/instances/{instances[0].SOPInstanceUID}"
    )
    assert "FailedSOPSequence" not in response
    assert stored_uids(archive, study) == {ds.SOPInstanceUID for ds in instances}


def test_store_into_a_study_refuses_instances_of_another(base_url: str, archive: Archive) -> None:
    mine, other = ct_series(1), ct_series(1)
    study = mine[0].StudyInstanceUID
    response = requests.post(
        f"{base_url}/studies/{study}",
        data=multipart([part10(mine[0]), part10(other[0])]),
        headers={"Content-Type": STOW_TYPE},
        timeout=60,
    )
    assert response.status_code == 202
    body = Dataset.from_json(response.json())
    assert body.RetrieveURL.endswith(f"/studies/{study}")
    assert body.FailedSOPSequence[0].ReferencedSOPInstanceUID == other[0].SOPInstanceUID
    assert body.FailedSOPSequence[0].FailureReason == 0xC409
    assert stored_uids(archive, study) == {mine[0].SOPInstanceUID}
    assert stored_uids(archive, other[0].StudyInstanceUID) == set()


def test_one_broken_part_among_good_ones_is_202(base_url: str, archive: Archive) -> None:
    good = ct_series(2)
    broken = part10(ct_series(1)[0])[:400]  # cut inside the data set
    response = requests.post(
        f"{base_url}/studies",
        data=multipart([part10(good[0]), broken, part10(good[1])]),
        headers={"Content-Type": STOW_TYPE},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    assert response.headers["Content-Type"].startswith("application/dicom+json")
    body = Dataset.from_json(response.json())
    assert [i.ReferencedSOPInstanceUID for i in body.ReferencedSOPSequence] == [
        ds.SOPInstanceUID for ds in good
    ]
    assert len(body.FailedSOPSequence) == 1
    assert body.FailedSOPSequence[0].FailureReason == 0xC000
    assert stored_uids(archive, good[0].StudyInstanceUID) == {ds.SOPInstanceUID for ds in good}


def test_all_parts_failing_is_409(base_url: str) -> None:
    response = requests.post(
        f"{base_url}/studies",
        data=multipart([b"not dicom at all", b"nor this"]),
        headers={"Content-Type": STOW_TYPE},
        timeout=60,
    )
    assert response.status_code == 409
    assert len(Dataset.from_json(response.json()).FailedSOPSequence) == 2


def test_chunked_body_with_a_boundary_split_across_reads(base_url: str, archive: Archive) -> None:
    instances = ct_series(2, size=64)
    body = multipart([part10(ds) for ds in instances])

    def chunks():  # odd sizes, so delimiters straddle the chunks the server reads
        for start in range(0, len(body), 997):
            yield body[start : start + 997]

    response = requests.post(
        f"{base_url}/studies", data=chunks(), headers={"Content-Type": STOW_TYPE}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert stored_uids(archive, instances[0].StudyInstanceUID) == {
        ds.SOPInstanceUID for ds in instances
    }


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        'multipart/related; type="application/dicom+json"; boundary=x',
        "application/json",
    ],
)
def test_unsupported_media_type_is_415(base_url: str, content_type: str) -> None:
    response = requests.post(
        f"{base_url}/studies", data=b"{}", headers={"Content-Type": content_type}, timeout=60
    )
    assert response.status_code == 415
    assert "multipart/related" in response.json()["error"]


def test_malformed_multipart_is_400(base_url: str) -> None:
    response = requests.post(
        f"{base_url}/studies", data=b"no delimiter here", headers={"Content-Type": STOW_TYPE},
        timeout=60,
    )  # fmt: skip
    assert response.status_code == 400


def test_body_over_the_limit_is_413(settings: Settings, archive: Archive, tmp_path) -> None:
    limited = settings.model_copy(
        update={"http": settings.http.model_copy(update={"stow_max_bytes": 4096})}
    )
    server = HttpServer(create_app(limited, archive), "127.0.0.1", free_port())
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/dicomweb/studies"
        instance = ct_series(1, size=64)[0]
        body = multipart([part10(instance)])
        sized = requests.post(url, data=body, headers={"Content-Type": STOW_TYPE}, timeout=60)
        # Chunked: no Content-Length, refused while reading.
        chunked = requests.post(
            url, data=iter([body[:3000], body[3000:]]), headers={"Content-Type": STOW_TYPE},
            timeout=60,
        )  # fmt: skip
    finally:
        server.stop()
    assert sized.status_code == 413
    assert "http.stow_max_bytes" in sized.json()["error"]
    assert chunked.status_code == 413
    assert "http.stow_max_bytes" in chunked.json()["error"]
    assert stored_uids(archive, instance.StudyInstanceUID) == set()
    # The part spooled before the body was cut off is gone too.
    assert list((settings.server.data_dir / "tmp").iterdir()) == []


def test_media_type_names_are_case_insensitive(base_url: str, archive: Archive) -> None:
    (instance,) = ct_series(1, size=16)
    body = multipart([part10(instance)], content_type="Application/DICOM")
    response = requests.post(
        f"{base_url}/studies",
        data=body,
        headers={
            "Content-Type": f'Multipart/Related; type="Application/Dicom"; boundary={BOUNDARY}'
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert stored_uids(archive, instance.StudyInstanceUID) == {instance.SOPInstanceUID}


def test_a_part_without_headers_is_stored(base_url: str, archive: Archive) -> None:
    (instance,) = ct_series(1, size=16)
    body = f"--{BOUNDARY}\r\n\r\n".encode() + part10(instance) + f"\r\n--{BOUNDARY}--".encode()
    response = requests.post(
        f"{base_url}/studies", data=body, headers={"Content-Type": STOW_TYPE}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert stored_uids(archive, instance.StudyInstanceUID) == {instance.SOPInstanceUID}


@pytest.mark.parametrize("cut", ["malformed", "too large"])
def test_a_body_that_breaks_off_reports_what_was_stored(
    settings: Settings, archive: Archive, cut: str
) -> None:
    first, second = ct_series(2, size=16)
    good = multipart([part10(first)]).removesuffix(f"--{BOUNDARY}--\r\n".encode())
    if cut == "malformed":
        body = good + f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += part10(second)  # no closing delimiter
        limit = settings.http.stow_max_bytes
    else:
        # Reads are at most 1 MiB: the first part is whole before the limit is crossed.
        body = good + f"--{BOUNDARY}\r\n\r\n".encode() + part10(second) + bytes(3 << 20)
        limit = 3 << 19
    limited = settings.model_copy(
        update={"http": settings.http.model_copy(update={"stow_max_bytes": limit})}
    )
    server = serve(limited, archive)
    try:
        response = requests.post(
            f"http://127.0.0.1:{server.port}/dicomweb/studies",
            data=iter([good, body[len(good) :]]),  # chunked: the limit bites while reading
            headers={"Content-Type": STOW_TYPE},
            timeout=60,
        )
    finally:
        server.stop()
    assert response.status_code == 202, response.text
    result = Dataset.from_json(response.json())
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [
        first.SOPInstanceUID
    ]
    (failure,) = result.FailedSOPSequence
    assert failure.FailureReason == (0xC000 if cut == "malformed" else 0xA700)
    assert response.headers["Warning"].startswith('299 hilum "body broke off')
    assert stored_uids(archive, first.StudyInstanceUID) == {first.SOPInstanceUID}
    assert list((settings.server.data_dir / "tmp").iterdir()) == []


def test_parts_are_stored_in_groups_and_reported_in_part_order(
    base_url: str, archive: Archive, settings: Settings
) -> None:
    """Groups of ``GROUP_PARTS`` parts, one ingest (one index transaction, one audit record
    of what it stored) each: a refused part inside a group (not DICOM) and one opening the
    next group (another study's, sent to /studies/{study}) leave the rest stored, both
    sequences in the order the parts came, and no spooled part behind."""
    group = stow.GROUP_PARTS
    instances = ct_series(2 * group - 1)  # with the two refused parts: two groups and one part
    study = instances[0].StudyInstanceUID
    stranger = ct_series(1)[0]
    parts = [part10(ds) for ds in instances]
    body = multipart([parts[0], b"not dicom", *parts[1 : group - 1], part10(stranger),
                      *parts[group - 1 :]])  # fmt: skip
    response = requests.post(
        f"{base_url}/studies/{study}", data=body, headers={"Content-Type": STOW_TYPE}, timeout=60
    )
    assert response.status_code == 202, response.text
    result = Dataset.from_json(response.json())
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [
        ds.SOPInstanceUID for ds in instances
    ]
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in result.FailedSOPSequence] == [
        ("", 0xC000), (stranger.SOPInstanceUID, 0xC409)
    ]  # fmt: skip
    assert stored_uids(archive, study) == {ds.SOPInstanceUID for ds in instances}
    # One transaction per group, each recording what it stored (PS3.15 A.5.3.7): the first
    # group lost its refused part, the second the stranger, the last holds one part.
    records = search_records(archive.index, AuditSearch(study=study, limit=1000))
    stored = [r["instances"] for r in reversed(records) if r["event"] == AuditEvent.STORE]
    assert stored == [group - 1, group - 1, 1]
    assert list((settings.server.data_dir / "tmp").iterdir()) == []
