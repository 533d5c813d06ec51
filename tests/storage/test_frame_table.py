"""The frame table ingest records (storage.frame_table): each frame's byte ranges in the stored
file, packed; checked against the frames themselves and against pydicom's reading of them."""

from __future__ import annotations

import struct
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from alembic import command
from alembic.config import Config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEGBaseline8Bit,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)
from sqlalchemy import inspect, update

from storage.archive import Archive
from storage.dicom_file import read_instance_header
from storage.frame_table import (
    ENCAPSULATED_WIDE,
    EncapsulatedTableBuilder,
    JsonFrameTable,
    PackedFrameTable,
    native_frame_table,
    stored_frame_table,
)
from storage.index.database import MIGRATIONS, upgrade_database
from storage.index.models import Instance
from storage.ingest import Origin, ingest_file
from storage.query import Query, QueryLevel, locate_instances
from tests.factories import ct_instance, write_part10


def encapsulated_slide(
    frames: list[bytes], *, fragments_per_frame: int = 1, has_bot: bool = True
) -> Dataset:
    """A VL Whole Slide Microscopy image whose frames are ``frames``, as stored."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID, ds.Modality = "WSI-1", "SM"
    ds.Rows = ds.Columns = 8
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate(frames, fragments_per_frame=fragments_per_frame, has_bot=has_bot)
    ds["PixelData"].VR = "OB"
    return ds


def jpeg_like_frames(count: int, size: int = 24) -> list[bytes]:
    """Frames that begin with a JPEG SOI marker (what frames are told apart by without an
    offset table), each different."""
    return [b"\xff\xd8" + struct.pack("<I", i) * ((size - 2) // 4) for i in range(count)]


def stored_frames(path: Path, table: PackedFrameTable) -> list[bytes]:
    content = path.read_bytes()
    return [
        b"".join(content[offset : offset + length] for offset, length in table.byte_ranges(n))
        for n in range(1, table.number_of_frames + 1)
    ]


def packed_table(path: Path) -> PackedFrameTable:
    packed = read_instance_header(path).frame_table
    assert packed is not None
    return PackedFrameTable(packed)


def test_one_fragment_per_frame_is_one_range_of_4_bytes_per_frame(tmp_path: Path) -> None:
    frames = jpeg_like_frames(5)
    path = write_part10(encapsulated_slide(frames), tmp_path / "slide.dcm")
    packed = read_instance_header(path).frame_table
    assert packed is not None and len(packed) == 32 + 4 * (5 + 1)
    table = PackedFrameTable(packed)
    assert [len(table.byte_ranges(n)) for n in range(1, 6)] == [1] * 5
    assert stored_frames(path, table) == frames


@pytest.mark.parametrize("has_bot", [True, False], ids=["offset table", "start markers"])
def test_frames_of_several_fragments_each(tmp_path: Path, has_bot: bool) -> None:
    frames = jpeg_like_frames(4, size=48)
    ds = encapsulated_slide(frames, fragments_per_frame=3, has_bot=has_bot)
    path = write_part10(ds, tmp_path / "slide.dcm")
    table = packed_table(path)
    assert [len(table.byte_ranges(n)) for n in range(1, 5)] == [3] * 4
    assert stored_frames(path, table) == frames
    content = path.read_bytes()
    # The ranges are the fragments' values: each follows its 8-byte item header.
    for offset, length in table.byte_ranges(3):
        assert struct.unpack("<HHL", content[offset - 8 : offset]) == (0xFFFE, 0xE000, length)


def test_one_frame_in_many_fragments(tmp_path: Path) -> None:
    frame = jpeg_like_frames(1, size=400)[0]
    path = write_part10(encapsulated_slide([frame], fragments_per_frame=10), tmp_path / "slide.dcm")
    table = packed_table(path)
    assert len(table.byte_ranges(1)) == 10
    assert stored_frames(path, table) == [frame]


def test_frames_that_cannot_be_told_apart_get_no_table(tmp_path: Path) -> None:
    # No offset table and no start markers: which fragment starts a frame is unknown.
    frames = [bytes([i]) * 16 for i in range(1, 4)]
    ds = encapsulated_slide(frames, fragments_per_frame=2, has_bot=False)
    path = write_part10(ds, tmp_path / "slide.dcm")
    assert read_instance_header(path).frame_table is None


def test_native_multi_frame_table_holds_no_entry_per_frame(tmp_path: Path) -> None:
    ds = ct_instance(size=16)
    ds.NumberOfFrames = 7
    pixels = np.arange(7 * 16 * 16, dtype=np.uint16).reshape(7, 16, 16)
    ds.PixelData = pixels.tobytes()
    path = write_part10(ds, tmp_path / "native.dcm")
    packed = read_instance_header(path).frame_table
    assert packed is not None and len(packed) == 32
    table = PackedFrameTable(packed)
    assert table.number_of_frames == 7
    assert stored_frames(path, table) == [frame.tobytes() for frame in pixels]
    # Everything before the first frame is the header up to the Pixel Data value.
    head = path.read_bytes()[: table.pixel_data_at]
    assert head.endswith(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 7 * 16 * 16 * 2))


def test_frame_n_of_a_100_000_frame_slide(tmp_path: Path) -> None:
    """A 2 GB slide of 256x256 tiles has about 100 000 frames: its table is built without an
    object per frame (the JSON lists took about 300 bytes per frame, 30 MB) and one frame is
    read from it by slicing."""
    count = 100_000
    frames = [b"\xff\xd8" + struct.pack("<L", i) + b"\xff\xd9" for i in range(count)]
    path = write_part10(encapsulated_slide(frames, has_bot=False), tmp_path / "slide.dcm")
    content = path.read_bytes()
    tracemalloc.start()
    try:
        header = read_instance_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header.frame_table is not None and len(header.frame_table) == 32 + 4 * (count + 1)
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB traced while the table was built"
    table = PackedFrameTable(header.frame_table)
    for n in (1, 2, 54_321, count - 1, count):
        [(offset, length)] = table.byte_ranges(n)
        assert content[offset : offset + length] == frames[n - 1]
    with pytest.raises(IndexError):
        table.byte_ranges(count + 1)


def test_a_json_row_and_a_packed_row_answer_alike(tmp_path: Path) -> None:
    frames = jpeg_like_frames(3, size=40)
    path = write_part10(encapsulated_slide(frames, fragments_per_frame=2), tmp_path / "slide.dcm")
    packed = packed_table(path)
    # What ingest wrote before migration 0013: per frame, its [offset, length] fragments.
    legacy = [[list(r) for r in packed.byte_ranges(n)] for n in range(1, 4)]
    json_table = stored_frame_table(None, legacy)
    assert isinstance(json_table, JsonFrameTable)
    assert [json_table.byte_ranges(n) for n in range(1, 4)] == [
        packed.byte_ranges(n) for n in range(1, 4)
    ]
    assert json_table.pixel_data_at == packed.pixel_data_at
    # A row with both (never written, but possible after a manual edit): the packed one wins.
    assert isinstance(stored_frame_table(native_frame_table(10, 4, 3), legacy), PackedFrameTable)
    assert stored_frame_table(None, None) is None and stored_frame_table(None, []) is None


@pytest.mark.parametrize(
    "packed",
    [
        b"",
        b"\x01" * 31,
        native_frame_table(100, 4, 3) + b"\0" * 8,
        native_frame_table(100, 4, 0),
        struct.pack("<4Q", 9, 1, 1, 1),  # unknown kind
        struct.pack("<4Q2I", 2, 2, 1, 100, 0, 20),  # more frames than fragments
        struct.pack("<4QI", 2, 1, 1, 100, 0),  # the end bound missing
        struct.pack("<4Q2Q", 2, 1, 1, 100, 0, 20),  # 64-bit words in a 32-bit table
    ],
)
def test_a_table_that_does_not_hold_together_is_not_used(packed: bytes) -> None:
    assert stored_frame_table(packed, None, "key") is None


def _pixel_data_test_files() -> list[Path]:
    paths = []
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    for path in sorted(folder.rglob("*.dcm")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
                if "PixelData" in ds and ds.file_meta.TransferSyntaxUID.is_encapsulated:
                    paths.append(path)
        except Exception:
            continue
    return paths


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", _pixel_data_test_files(), ids=lambda p: p.name)
def test_frames_of_pydicoms_encapsulated_test_files_are_pydicoms(path: Path) -> None:
    """Differential: every frame located is byte for byte the frame pydicom reads."""
    try:
        header = read_instance_header(path)
    except Exception as error:  # refused at ingest: nothing is located
        pytest.skip(f"not ingested: {error}")
    if header.frame_table is None:
        pytest.skip("frames not located by range")
    ds = pydicom.dcmread(path)
    expected = list(generate_frames(ds.PixelData, number_of_frames=header.number_of_frames))
    table = PackedFrameTable(header.frame_table)
    assert table.number_of_frames == header.number_of_frames
    assert stored_frames(path, table) == expected


def test_fragments_past_4_gib_take_64_bit_words() -> None:
    """Pixel Data of 4 GiB or more (``[limits]`` permitting): the builder widens its words."""
    builder = EncapsulatedTableBuilder(3)
    base = 5_000_000_000  # past 2**32 itself: only the span decides
    for at in (base, base + 100, base + (5 << 30)):
        builder.add_fragment(at)
    packed = builder.finish(base + (5 << 30) + 58, None)
    assert struct.unpack_from("<Q", packed)[0] == ENCAPSULATED_WIDE
    assert len(packed) == 32 + 8 * 4
    table = PackedFrameTable(packed)
    assert [table.byte_ranges(n) for n in (1, 2, 3)] == [
        [(base, 92)],
        [(base + 100, (5 << 30) - 108)],
        [(base + (5 << 30), 50)],
    ]
    narrow = EncapsulatedTableBuilder(1)
    narrow.add_fragment(base)
    narrow.add_fragment(base + 20)
    table = PackedFrameTable(narrow.finish(base + 40, (0,)))
    assert table.byte_ranges(1) == [(base, 12), (base + 20, 12)]
    assert table.pixel_data_at == base


def test_migration_0013_keeps_json_rows_served_both_ways(archive: Archive, tmp_path: Path) -> None:
    """Down to 0012 (the column dropped, the JSON rows kept) and up again: a row from before
    the migration is located with its JSON table, by the same ``byte_ranges``."""
    frames = jpeg_like_frames(3, size=40)
    path = write_part10(encapsulated_slide(frames, fragments_per_frame=2), tmp_path / "s.dcm")
    ingest_file(archive, path, Origin())
    packed = packed_table(path)
    legacy = [[list(r) for r in packed.byte_ranges(n)] for n in range(1, 4)]
    with archive.index.write() as session:
        session.execute(update(Instance).values(frame_table=None, frame_ranges=legacy))
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with archive.index.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0012")
    columns = inspect(archive.index.engine).get_columns("instance")
    assert "frame_table" not in {column["name"] for column in columns}
    upgrade_database(archive.index.engine)

    (located,) = locate_instances(
        archive, Query(QueryLevel.IMAGE, {"SOPInstanceUID": "*"}), with_frame_ranges=True
    )
    assert isinstance(located.frame_ranges, JsonFrameTable)
    content = path.read_bytes()
    assert [
        b"".join(content[o : o + n] for o, n in located.frame_ranges.byte_ranges(f))
        for f in (1, 2, 3)
    ] == frames
