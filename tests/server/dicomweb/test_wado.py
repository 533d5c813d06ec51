"""WADO-RS (PS3.18 10.4) with dicomweb-client against the real server: what comes back equals
what was stored; transfer-syntax negotiation; metadata, frames, bulk data, rendered; 404/406."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from config import Settings
from storage.archive import Archive, open_archive
from storage.pixel_decoding import RenderingParameters, render
from storage.query import Query, QueryLevel, locate_instances
from tests.conftest import S3Server, make_settings, s3_blob_url
from tests.factories import ct_instance, data_set_differences
from tests.server.dicomweb.conftest import ct_series, multipart_parts, serve
from tests.tcp_proxy import TcpProxy

ENCAPSULATED_DOCUMENT = 0x00420011  # an OB element long enough to become bulk data


def with_bulk_data(ds: Dataset) -> Dataset:
    ds.add_new(ENCAPSULATED_DOCUMENT, "OB", bytes(range(256)) * 8)
    item = Dataset()
    item.add_new(ENCAPSULATED_DOCUMENT, "OB", b"\x07" * 2048)
    ds.ReferencedImageSequence = [item]
    return ds


def multi_frame(frames: int = 3) -> Dataset:
    ds = ct_instance(size=16)
    ds.NumberOfFrames = frames
    pixels = np.arange(frames * 16 * 16, dtype=np.uint16).reshape(frames, 16, 16)
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.fixture
def stored(client: DICOMwebClient) -> list[Dataset]:
    """A series of 2 CT instances (one with bulk data), and a 3-frame instance in the study."""
    series = ct_series(2)
    with_bulk_data(series[1])
    frames = multi_frame()
    frames.StudyInstanceUID = series[0].StudyInstanceUID
    client.store_instances([*series, frames])
    return [*series, frames]


def by_uid(datasets: list[Dataset]) -> dict[str, Dataset]:
    return {ds.SOPInstanceUID: ds for ds in datasets}


def test_retrieve_study_series_and_instance(client: DICOMwebClient, stored: list[Dataset]) -> None:
    study, series = stored[0].StudyInstanceUID, stored[0].SeriesInstanceUID
    sent = by_uid(stored)

    received = by_uid(client.retrieve_study(study))
    assert received.keys() == sent.keys()
    for uid, ds in received.items():
        assert data_set_differences(sent[uid], ds) == []

    assert by_uid(client.retrieve_series(study, series)).keys() == {
        stored[0].SOPInstanceUID,
        stored[1].SOPInstanceUID,
    }
    one = client.retrieve_instance(study, series, stored[1].SOPInstanceUID)
    assert data_set_differences(stored[1], one) == []
    assert one[ENCAPSULATED_DOCUMENT].value == stored[1][ENCAPSULATED_DOCUMENT].value


def test_transfer_syntax_negotiation(
    base_url: str, client: DICOMwebClient, stored: list[Dataset]
) -> None:
    ds = stored[0]
    args = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    as_stored = client.retrieve_instance(*args, media_types=(("application/dicom", "*"),))
    assert as_stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID

    j2k = client.retrieve_instance(*args, media_types=(("application/dicom", JPEG2000Lossless),))
    assert j2k.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(j2k.pixel_array, ds.pixel_array)
    # Another encoding of the same instance, not a new instance.
    assert j2k.SOPInstanceUID == ds.SOPInstanceUID
    assert j2k.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

    # JPEG Baseline is lossy: Hilum does not encode it, so nothing acceptable is left.
    response = requests.get(
        f"{base_url}/studies/{args[0]}/series/{args[1]}/instances/{args[2]}",
        headers={"Accept": 'multipart/related; type="application/dicom"; '
                 "transfer-syntax=1.2.840.10008.1.2.4.50"},
        timeout=30,
    )  # fmt: skip
    assert response.status_code == 406


def test_retrieve_metadata(client: DICOMwebClient, stored: list[Dataset]) -> None:
    study, series = stored[0].StudyInstanceUID, stored[0].SeriesInstanceUID
    metadata = client.retrieve_study_metadata(study)
    assert {m["00080018"]["Value"][0] for m in metadata} == by_uid(stored).keys()
    series_metadata = client.retrieve_series_metadata(study, series)
    assert len(series_metadata) == 2
    instance = Dataset.from_json(
        client.retrieve_instance_metadata(study, series, stored[1].SOPInstanceUID)
    )
    assert instance.PatientName == stored[1].PatientName
    assert instance.Rows == stored[1].Rows
    pixel_uri = client.retrieve_instance_metadata(study, series, stored[1].SOPInstanceUID)[
        "7FE00010"
    ]["BulkDataURI"]
    assert pixel_uri.endswith(f"/instances/{stored[1].SOPInstanceUID}/bulkdata/7FE00010")


def test_retrieve_bulkdata(base_url: str, client: DICOMwebClient, stored: list[Dataset]) -> None:
    ds = stored[1]
    metadata = client.retrieve_instance_metadata(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )

    def fetch(uri: str) -> list[bytes]:
        # dicomweb-client sends Host without the port; resolve the path against our base.
        path = uri.split("/dicomweb", 1)[1]
        return client.retrieve_bulkdata(base_url + path)

    top = metadata[f"{ENCAPSULATED_DOCUMENT:08X}"]["BulkDataURI"]
    assert fetch(top) == [ds[ENCAPSULATED_DOCUMENT].value]
    nested = metadata["00081140"]["Value"][0][f"{ENCAPSULATED_DOCUMENT:08X}"]["BulkDataURI"]
    assert nested.endswith("/bulkdata/00081140/0/00420011")
    assert fetch(nested) == [b"\x07" * 2048]
    assert fetch(metadata["7FE00010"]["BulkDataURI"]) == [ds.PixelData]


def test_retrieve_frames(client: DICOMwebClient, stored: list[Dataset]) -> None:
    ds = stored[2]
    frame_bytes = 16 * 16 * 2
    frames = client.retrieve_instance_frames(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=[3, 1]
    )
    assert frames == [ds.PixelData[2 * frame_bytes :], ds.PixelData[:frame_bytes]]


def test_frames_of_a_compressed_instance(base_url: str, client: DICOMwebClient) -> None:
    ds = multi_frame(2)
    ds.compress(RLELossless)
    client.store_instances([ds])
    args = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    from pydicom.encaps import generate_frames

    stored_frames = list(generate_frames(ds.PixelData, number_of_frames=2))
    as_stored = client.retrieve_instance_frames(
        *args, frame_numbers=[2], media_types=("image/dicom-rle",)
    )
    assert as_stored == [stored_frames[1]]
    decoded = client.retrieve_instance_frames(
        *args, frame_numbers=[2], media_types=("application/octet-stream",)
    )
    assert decoded == [ds.pixel_array[1].astype("<u2").tobytes()]

    native = ct_series(1)[0]
    client.store_instances([native])
    response = requests.get(
        f"{base_url}/studies/{native.StudyInstanceUID}/series/{native.SeriesInstanceUID}"
        f"/instances/{native.SOPInstanceUID}/frames/1",
        headers={"Accept": 'multipart/related; type="image/jpeg"'},
        timeout=30,
    )
    assert response.status_code == 406


def test_rendered_and_thumbnail(
    base_url: str, client: DICOMwebClient, stored: list[Dataset]
) -> None:
    ds = stored[0]
    args = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    jpeg = client.retrieve_instance_rendered(*args, media_types=("image/jpeg",))
    image = Image.open(BytesIO(jpeg))
    assert (image.format, image.size) == ("JPEG", (32, 32))

    png = client.retrieve_instance_rendered(
        *args, media_types=("image/png",), params={"window": "100,400,linear", "viewport": "16,16"}
    )
    assert Image.open(BytesIO(png)).size == (16, 16)
    frame = client.retrieve_instance_frames_rendered(
        stored[2].StudyInstanceUID, stored[2].SeriesInstanceUID, stored[2].SOPInstanceUID,
        frame_numbers=[2], media_types=("image/png",),
    )  # fmt: skip
    assert Image.open(BytesIO(frame)).size == (16, 16)
    series = client.retrieve_series_rendered(*args[:2], media_types=("image/jpeg",))
    assert Image.open(BytesIO(series)).format == "JPEG"

    for path in (
        f"/studies/{args[0]}/thumbnail",
        f"/studies/{args[0]}/series/{args[1]}/thumbnail",
        f"/studies/{args[0]}/series/{args[1]}/instances/{args[2]}/thumbnail",
    ):
        response = requests.get(base_url + path, headers={"Accept": "image/png"}, timeout=30)
        assert response.status_code == 200, path
        assert Image.open(BytesIO(response.content)).format == "PNG"
    bad = requests.get(
        f"{base_url}/studies/{args[0]}/series/{args[1]}/instances/{args[2]}/rendered",
        params={"window": "1,2"}, headers={"Accept": "image/jpeg"}, timeout=30,
    )  # fmt: skip
    assert bad.status_code == 400
    refused = requests.get(
        f"{base_url}/studies/{args[0]}/series/{args[1]}/instances/{args[2]}/rendered",
        headers={"Accept": "image/gif"}, timeout=30,
    )  # fmt: skip
    assert refused.status_code == 406


@pytest.mark.parametrize(
    "path",
    [
        "/studies/{unknown}",
        "/studies/{unknown}/metadata",
        "/studies/{study}/series/{unknown}",
        "/studies/{study}/series/{series}/instances/{unknown}/metadata",
        "/studies/{study}/series/{series}/instances/{unknown}/frames/1",
        "/studies/{study}/series/{series}/instances/{instance}/frames/9",
        "/studies/{study}/series/{series}/instances/{instance}/bulkdata/00100010",
    ],
)
def test_unknown_is_404(base_url: str, stored: list[Dataset], path: str) -> None:
    ds = stored[0]
    url = base_url + path.format(
        unknown=generate_uid(),
        study=ds.StudyInstanceUID,
        series=ds.SeriesInstanceUID,
        instance=ds.SOPInstanceUID,
    )
    assert requests.get(url, timeout=30).status_code == 404


def test_invalid_uid_and_frame_list_are_400(base_url: str, stored: list[Dataset]) -> None:
    ds = stored[0]
    assert requests.get(f"{base_url}/studies/not-a-uid", timeout=30).status_code == 400
    frames = (
        f"{base_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/0,x"
    )
    assert requests.get(frames, timeout=30).status_code == 400


def test_a_failed_transcoding_is_406_before_the_body(base_url: str, stored: list[Dataset]) -> None:
    # OpenJPEG refuses a 16x16 image at its default number of resolutions.
    ds = stored[2]
    response = requests.get(
        f"{base_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}",
        headers={"Accept": f'multipart/related; type="application/dicom"; '
                 f"transfer-syntax={JPEG2000Lossless}"},
        timeout=30,
    )  # fmt: skip
    assert response.status_code == 406
    assert "cannot convert Explicit VR Little Endian" in response.json()["error"]


def instance_path(ds: Dataset) -> str:
    return (
        f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def test_the_default_accept_of_http_libraries(base_url: str, stored: list[Dataset]) -> None:
    instance = requests.get(base_url + instance_path(stored[0]), timeout=30)
    assert instance.request.headers["Accept"] == "*/*"  # what requests (and curl) send
    assert instance.status_code == 200, instance.text
    assert instance.headers["Content-Type"].startswith(
        'multipart/related; type="application/dicom"'
    )
    ((headers, body),) = multipart_parts(instance)
    assert headers["content-type"].startswith("application/dicom; transfer-syntax=")
    assert data_set_differences(pydicom.dcmread(BytesIO(body)), stored[0]) == []

    frame = requests.get(
        base_url + instance_path(stored[2]) + "/frames/2",
        headers={"Accept": "multipart/*"},
        timeout=30,
    )
    assert frame.status_code == 200, frame.text
    ((_, pixels),) = multipart_parts(frame)
    assert pixels == stored[2].pixel_array[1].astype("<u2").tobytes()


def test_ohif_frame_request_gets_the_stored_rle_bytes(
    base_url: str, client: DICOMwebClient
) -> None:
    ds = multi_frame(2)
    ds.compress(RLELossless)
    client.store_instances([ds])
    response = requests.get(
        base_url + instance_path(ds) + "/frames/1,2",
        headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    parts = multipart_parts(response)
    assert [h["content-type"] for h, _ in parts] == [
        f"application/octet-stream; transfer-syntax={RLELossless}"
    ] * 2
    assert [body for _, body in parts] == list(generate_frames(ds.PixelData, number_of_frames=2))


@pytest.mark.parametrize(
    "path",
    [
        "/studies/*",
        "/studies/*/metadata",
        "/studies/1.2.3%5C1.2.4/metadata",
        "/studies/{study}/series/*",
        "/studies/{study}/series/{series}/instances/*/frames/1",
        "/studies/{study}/series/{series}/instances/1.2.3,1.2.4/rendered",
        "/studies/{study}/thumbnail?x=1".replace("{study}", "1.2.03"),
    ],
)
def test_path_uids_are_checked(base_url: str, stored: list[Dataset], path: str) -> None:
    ds = stored[0]
    url = base_url + path.format(study=ds.StudyInstanceUID, series=ds.SeriesInstanceUID)
    response = requests.get(url, timeout=30)
    assert response.status_code == 400
    assert "is not a valid UID" in response.json()["error"]


@pytest.mark.parametrize("frames", ["0", "-1", "0,1", "1,x"])
@pytest.mark.parametrize("resource", ["rendered", "thumbnail"])
def test_rendered_frame_numbers_start_at_1(
    base_url: str, stored: list[Dataset], frames: str, resource: str
) -> None:
    response = requests.get(
        f"{base_url}{instance_path(stored[2])}/frames/{frames}/{resource}",
        headers={"Accept": "image/png"},
        timeout=30,
    )
    assert response.status_code == 400
    assert "frame" in response.json()["error"]


def test_rendered_frame_is_the_frame_asked_for(base_url: str, stored: list[Dataset]) -> None:
    ds = stored[2]
    pngs = [
        requests.get(
            f"{base_url}{instance_path(ds)}/frames/{n}/rendered",
            params={"window": "-640,768,linear-exact"},
            headers={"Accept": "image/png"},
            timeout=30,
        )
        for n in (1, 3)
    ]
    metadata = Dataset(ds).to_json_dict(bulk_data_threshold=1 << 30)
    params = RenderingParameters((-640.0, 768.0, "linear-exact"))
    expected = [
        Image.open(BytesIO(render(ds.pixel_array[i], metadata, params, "image/png")))
        for i in (0, 2)
    ]
    assert len({np.asarray(e).tobytes() for e in expected}) == 2  # the frames differ
    assert [np.asarray(Image.open(BytesIO(r.content))).tolist() for r in pngs] == [
        np.asarray(e).tolist() for e in expected
    ]


def test_transcoding_above_the_size_limit_is_406(
    settings: Settings, archive: Archive, client: DICOMwebClient
) -> None:
    ds = multi_frame(2)
    ds.compress(RLELossless)
    client.store_instances([ds])
    limited = settings.model_copy(
        update={"server": settings.server.model_copy(update={"transcode_max_bytes": 1024})}
    )
    server = serve(limited, archive)
    try:
        url = f"http://127.0.0.1:{server.port}/dicomweb{instance_path(ds)}"
        explicit = 'multipart/related; type="application/dicom"'  # Explicit VR Little Endian
        refused = requests.get(url, headers={"Accept": explicit}, timeout=30)
        as_stored = requests.get(url, timeout=30)
    finally:
        server.stop()
    assert refused.status_code == 406
    assert "[server] transcode_max_bytes" in refused.json()["error"]
    assert as_stored.status_code == 200


def test_frames_of_an_instance_without_ranges_read_the_blob_once(
    tmp_path: Path, postgres_url: str, s3_server: S3Server
) -> None:
    """Counted where it costs: the object store, behind a proxy that keeps the requests it
    passes on. Three frames of a file without recorded frame ranges: one GET of its blob."""
    # Deflated: no frame byte ranges can be recorded at ingest.
    ds = multi_frame(3)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    proxy = TcpProxy(s3_server.port, keep_sent=True)
    settings = make_settings(
        tmp_path,
        database_url=postgres_url,
        blob_url=s3_blob_url(f"http://127.0.0.1:{proxy.port}"),
    )
    archive = open_archive(settings, migrate=True)
    server = serve(settings, archive)
    try:
        base_url = f"http://127.0.0.1:{server.port}/dicomweb"
        DICOMwebClient(base_url).store_instances([ds])
        (located,) = locate_instances(
            archive, Query(QueryLevel.STUDY, {"StudyInstanceUID": ds.StudyInstanceUID}),
            with_frame_ranges=True,
        )  # fmt: skip
        assert located.frame_ranges is None
        sent_before = len(proxy.sent())
        response = requests.get(
            f"{base_url}{instance_path(ds)}/frames/3,1,2",
            headers={"Accept": 'multipart/related; type="application/octet-stream"'},
            timeout=30,
        )
        sent = proxy.sent()[sent_before:]
    finally:
        server.stop()
        archive.close()
        proxy.close()

    assert response.status_code == 200, response.text
    assert [body for _, body in multipart_parts(response)] == [
        ds.pixel_array[i].astype("<u2").tobytes() for i in (2, 0, 1)
    ]
    key = located.blob_key.encode()
    requests_for_blob = [
        line for line in sent.split(b"\r\n") if line.startswith(b"GET ") and key in line
    ]
    assert len(requests_for_blob) == 1, requests_for_blob
