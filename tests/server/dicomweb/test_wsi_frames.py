"""A VL Whole Slide Microscopy image (TILED_FULL, JPEG frames) on PostgreSQL + S3: a frame is
one ranged GET of about that frame's size, and the bytes are exactly the stored frame."""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage, generate_uid
from sqlalchemy import select

from storage.archive import Archive
from storage.frame_table import PackedFrameTable
from storage.index.models import Instance
from tests.factories import ct_instance
from tests.server.dicomweb.conftest import multipart_parts

TILE, TILES_ACROSS, TILES_DOWN = 64, 4, 3


class CountingBlobStore:
    """Wraps the archive's blob store and records every read the server makes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.ranged_reads: list[int] = []  # bytes returned by each get_range
        self.whole_reads = 0

    def get_range(self, key: str, offset: int, length: int, *, tier: str = "") -> bytes:
        data = self.inner.get_range(key, offset, length, tier=tier)
        self.ranged_reads.append(len(data))
        return data

    def open(self, key: str, *, tier: str = "") -> Any:
        self.whole_reads += 1
        return self.inner.open(key, tier=tier)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def jpeg_tile(index: int) -> bytes:
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 255, (TILE, TILE, 3), dtype=np.uint8)
    pixels[: index * 4] = (index * 20, 80, 160)  # tiles of different sizes
    out = BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def whole_slide_image(tiles: list[bytes]) -> Dataset:
    """VL WSI, TILED_FULL (PS3.3 C.8.12.4.1.3): frames in row-major tile order."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "SLIDE^ONE", "WSI-1", "SM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixColumns = TILE * TILES_ACROSS
    ds.TotalPixelMatrixRows = TILE * TILES_DOWN
    ds.Rows = ds.Columns = TILE
    ds.NumberOfFrames = len(tiles)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate(tiles, has_bot=True)
    ds["PixelData"].VR = "OB"
    return ds


@pytest.mark.parametrize("backend", ["postgresql-s3"], indirect=True)
def test_frame_is_one_ranged_read_of_its_size(client: DICOMwebClient, archive: Archive) -> None:
    tiles = [jpeg_tile(i) for i in range(TILES_ACROSS * TILES_DOWN)]
    slide = whole_slide_image(tiles)
    client.store_instances([slide])
    counting = CountingBlobStore(archive.blobs)
    archive.blobs = counting  # the app reads through the same archive object
    args = (slide.StudyInstanceUID, slide.SeriesInstanceUID, slide.SOPInstanceUID)

    (frame,) = client.retrieve_instance_frames(
        *args, frame_numbers=[7], media_types=("image/jpeg",)
    )

    stored_fragment = tiles[6] + (b"\x00" if len(tiles[6]) % 2 else b"")  # PS3.5 A.4: even
    assert frame == stored_fragment
    assert counting.whole_reads == 0
    assert counting.ranged_reads == [len(stored_fragment)]

    counting.ranged_reads.clear()
    frames = client.retrieve_instance_frames(
        *args, frame_numbers=[1, 12], media_types=("image/jpeg",)
    )
    assert [f[:2] for f in frames] == [b"\xff\xd8", b"\xff\xd8"]
    assert counting.ranged_reads == [len(frames[0]), len(frames[1])]
    assert counting.whole_reads == 0

    rendered = client.retrieve_instance_frames_rendered(
        *args, frame_numbers=[7], media_types=("image/png",)
    )
    assert Image.open(BytesIO(rendered)).size == (TILE, TILE)
    assert counting.whole_reads == 0


def test_ohif_frame_request_gets_the_stored_jpeg_bytes(
    base_url: str, client: DICOMwebClient
) -> None:
    tiles = [jpeg_tile(i) for i in range(2)]
    slide = whole_slide_image(tiles)
    client.store_instances([slide])
    response = requests.get(
        f"{base_url}/studies/{slide.StudyInstanceUID}/series/{slide.SeriesInstanceUID}"
        f"/instances/{slide.SOPInstanceUID}/frames/2",
        # What OHIF sends for frames (its default, whatever the stored syntax).
        headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    ((headers, body),) = multipart_parts(response)
    assert headers["content-type"] == (
        f"application/octet-stream; transfer-syntax={JPEGBaseline8Bit}"
    )
    assert body == tiles[1] + (b"\x00" if len(tiles[1]) % 2 else b"")


def stored_frame(client: DICOMwebClient, ds: Dataset, number: int) -> bytes:
    """Frame ``number`` as stored (OHIF's ``transfer-syntax=*``), through WADO-RS."""
    (frame,) = client.retrieve_instance_frames(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
        frame_numbers=[number], media_types=(("application/octet-stream", "*"),),
    )  # fmt: skip
    return bytes(frame)


def counted(archive: Archive) -> CountingBlobStore:
    counting = CountingBlobStore(archive.blobs)
    archive.blobs = counting  # the app reads through the same archive object
    return counting


def test_frames_of_several_fragments_each_are_one_ranged_read(
    client: DICOMwebClient, archive: Archive
) -> None:
    tiles = [jpeg_tile(i) for i in range(5)]
    slide = whole_slide_image(tiles)
    slide.PixelData = encapsulate(tiles, fragments_per_frame=3, has_bot=True)
    client.store_instances([slide])
    counting = counted(archive)

    for number in (4, 1, 5):
        frame = stored_frame(client, slide, number)
        assert frame.rstrip(b"\x00") == tiles[number - 1].rstrip(b"\x00")
    # Each frame's three fragments in one read, item headers and all (3 x 8 bytes).
    assert counting.whole_reads == 0 and len(counting.ranged_reads) == 3
    assert all(0 < read - len(tiles[n - 1]) <= 2 * 8 + 2 for read, n in
               zip(counting.ranged_reads, (4, 1, 5), strict=True))  # fmt: skip


def test_native_multi_frame_frames_are_one_ranged_read_each(
    client: DICOMwebClient, archive: Archive
) -> None:
    ds = ct_instance(size=16)
    ds.NumberOfFrames = 6
    pixels = np.arange(6 * 16 * 16, dtype=np.uint16).reshape(6, 16, 16)
    ds.PixelData = pixels.tobytes()
    client.store_instances([ds])
    counting = counted(archive)

    assert [stored_frame(client, ds, n) for n in (6, 2)] == [pixels[5].tobytes(),
                                                            pixels[1].tobytes()]  # fmt: skip
    assert counting.ranged_reads == [16 * 16 * 2] * 2 and counting.whole_reads == 0


def test_frame_of_a_20_000_frame_slide(client: DICOMwebClient, archive: Archive) -> None:
    frames = [b"\xff\xd8" + struct.pack("<L", i) + b"\xff\xd9" for i in range(20_000)]
    slide = whole_slide_image(frames)
    slide.PixelData = encapsulate(frames, has_bot=False)
    client.store_instances([slide])
    counting = counted(archive)

    for number in (1, 12_345, 20_000):
        assert stored_frame(client, slide, number) == frames[number - 1]
    assert counting.ranged_reads == [8] * 3 and counting.whole_reads == 0


def test_a_row_with_json_frame_ranges_is_still_served(
    client: DICOMwebClient, archive: Archive
) -> None:
    """A row written before migration 0013 holds its frame table as JSON in ``frame_ranges``
    and none in ``frame_table``: its frames are read by range all the same."""
    tiles = [jpeg_tile(i) for i in range(4)]
    slide = whole_slide_image(tiles)
    slide.PixelData = encapsulate(tiles, fragments_per_frame=2, has_bot=True)
    slide.ICCProfile = bytes(range(256)) * 8  # bulk data (over 1 KiB) in the header
    client.store_instances([slide])
    with archive.index.write() as session:
        row = session.execute(
            select(Instance).where(Instance.sop_instance_uid == slide.SOPInstanceUID)
        ).scalar_one()
        assert row.frame_table is not None
        table = PackedFrameTable(row.frame_table)
        # What ingest wrote before: per frame, its [offset, length] fragments.
        row.frame_ranges = [[list(r) for r in table.byte_ranges(n)] for n in range(1, 5)]
        row.frame_table = None
    counting = counted(archive)

    for number in (3, 1):
        assert stored_frame(client, slide, number).rstrip(b"\x00") == tiles[number - 1]
    assert len(counting.ranged_reads) == 2 and counting.whole_reads == 0
    # Bulk data of the header: the header up to the Pixel Data value, one ranged read too.
    (icc,) = client.retrieve_bulkdata(
        f"{client.base_url}/studies/{slide.StudyInstanceUID}/series/{slide.SeriesInstanceUID}"
        f"/instances/{slide.SOPInstanceUID}/bulkdata/00282000"
    )
    assert icc == slide.ICCProfile
    assert len(counting.ranged_reads) == 3 and counting.whole_reads == 0
