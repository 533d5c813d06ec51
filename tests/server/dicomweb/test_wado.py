"""WADO-RS (PS3.18 10.4) with dicomweb-client against the real server: what comes back equals
what was stored; transfer-syntax negotiation; metadata, frames, bulk data, rendered; 404/406."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from tests.factories import ct_instance, data_set_differences
from tests.server.dicomweb.conftest import ct_series

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
    assert "cannot be transcoded" in response.json()["error"]
