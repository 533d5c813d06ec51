"""The size a compressed frame's codestream declares, read without decoding (issue 17), against
real codestreams from pydicom's test files and a crafted JPEG header."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.uid import JPEGBaseline8Bit, RLELossless

from storage.encapsulated_frame import check_data_set_frames, check_frame_header, declared_size
from storage.errors import InvalidInstance
from tests import hostile_files

# One file of each codestream family pydicom ships (JPEG baseline, extended, lossless, JPEG-LS,
# JPEG 2000), all local test files.
CODESTREAMS = [
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_jls_lossy_line.dcm",
    "MR_small_jp2klossless.dcm",
    "examples_jpeg2k.dcm",
    "SC_rgb_small_odd_jpeg.dcm",
]


@pytest.mark.parametrize("name", CODESTREAMS)
def test_declared_size_is_the_data_sets(name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name, download=False))
    frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))
    assert declared_size(ds.file_meta.TransferSyntaxUID, frame) == (
        ds.Rows,
        ds.Columns,
        ds.SamplesPerPixel,
    )
    check_data_set_frames(ds)  # agrees: no error


def test_rle_and_native_frames_declare_nothing() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm", download=False))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert declared_size(ds.file_meta.TransferSyntaxUID, frame) is None
    assert declared_size("1.2.840.10008.1.2.1", b"\xff\xd8\xff\xc0") is None


def test_a_jpeg_header_claiming_more_than_the_data_set_is_refused(tmp_path: Path) -> None:
    path = hostile_files.jpeg_claiming(tmp_path / "j.dcm", 16, 16, 2, header=(65535, 65535))
    ds = pydicom.dcmread(path)
    with pytest.raises(InvalidInstance, match="declares 65535 x 65535 x 3, the data set 16 x 16"):
        check_data_set_frames(ds)


def test_more_components_than_samples_is_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(hostile_files.jpeg_claiming(tmp_path / "j.dcm", 16, 16, 1))
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    check_frame_header(JPEGBaseline8Bit, frame, 16, 16, 3)
    with pytest.raises(InvalidInstance, match="16 x 16 x 3, the data set 16 x 16 x 1"):
        check_frame_header(JPEGBaseline8Bit, frame, 16, 16, 1)


def test_an_rle_header_that_agrees_with_the_data_set_passes() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm", download=False))
    check_data_set_frames(ds)  # pydicom's own RLE file: 2 segments for 16-bit samples


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ((1, 64), "declares 1 segments, the data set 2"),  # PS3.5 G.2: one a byte of a sample
        ((3, 64, 80, 96), "declares 3 segments, the data set 2"),
        ((2, 64, 4096), "outside the frame"),  # the second segment beyond the frame's end
        ((2, 80, 64), "out of order"),
        ((2, 32, 80), "out of order"),  # PS3.5 G.5: the first segment follows the header
    ],
)
def test_an_rle_header_that_disagrees_is_refused(header: tuple[int, ...], reason: str) -> None:
    frame = struct.pack("<16L", *header, *[0] * (16 - len(header))) + b"\x00" * 64
    with pytest.raises(InvalidInstance, match=reason):
        check_frame_header(RLELossless, frame, 16, 16, 1, 16)


def test_an_rle_frame_shorter_than_its_header_is_refused() -> None:
    with pytest.raises(InvalidInstance, match="less than its header"):
        check_frame_header(RLELossless, b"\x02\x00\x00\x00", 16, 16, 1, 16)
