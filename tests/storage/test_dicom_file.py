"""The header reader's fast paths (DICOM JSON, UID and integer values) must say exactly what
pydicom says."""

import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from storage.dicom_file import (
    BULK_DATA_THRESHOLD,
    integer_value,
    metadata_json,
    text_value,
    uid_value,
)
from storage.dicom_file import _json_safe as without_nul  # PostgreSQL's JSONB rule
from tests.factories import ct_instance, write_part10


def _bulk_data_uri(element: pydicom.DataElement) -> str:
    return f"bulkdata/{element.tag:08X}"


def _pydicom_json(dataset: Dataset) -> dict[str, Any]:
    """pydicom's own DICOM JSON of every element it can decode, element by element."""
    encoded: dict[str, Any] = {}
    for tag in dataset.keys():  # noqa: SIM118 - iterating converts every element
        try:
            element = dataset[tag]
            if element.VR == "SQ":
                value = {"vr": "SQ", "Value": [_pydicom_json(item) for item in element.value]}
            else:
                value = element.to_json_dict(_bulk_data_uri, BULK_DATA_THRESHOLD)
        except Exception:
            continue
        encoded[f"{tag:08X}"] = value
    return encoded


def _header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True, force=True)


PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _readable_test_files() -> list[Path]:
    paths = []
    for path in sorted(PYDICOM_TEST_FILES.rglob("*.dcm")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _header(path)
        except Exception:
            continue
        paths.append(path)
    return paths


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", _readable_test_files(), ids=lambda p: p.name)
def test_metadata_of_every_pydicom_test_file_equals_pydicoms_json(path: Path) -> None:
    # Two independent reads: pydicom converts every element of one, the fast path the other.
    expected = _pydicom_json(_header(path))
    actual = metadata_json(_header(path), has_pixel_data=False)
    assert actual == without_nul(expected)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_metadata_of_awkward_values_equals_pydicoms_json(tmp_path: Path, syntax: str) -> None:
    ds = ct_instance()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PatientName = "DOE^JOHN\\ROE^JANE"
    ds.OtherPatientNames = "A^B=C^D"  # ideographic group
    ds.ImageType = "ORIGINAL\\\\AXIAL "  # an empty value in the middle, trailing space
    ds.WindowCenter = "40\\-1.5e2 "
    ds.WindowWidth = ".5"
    ds.SeriesNumber = " 7 "
    ds.AcquisitionNumber = "1.0"  # not an integer string: pydicom's path
    ds.StudyDescription = "  leading kept, trailing dropped   "
    ds.ImageComments = "a backslash \\ in text stays"
    ds.StationName = " CT01 "  # AE: both sides stripped
    ds.PerformingPhysicianName = "A\x00B"  # a NUL inside: pydicom's path, the NUL dropped
    ds.ScheduledStudyLocationAETitle = "SCP1\x00"  # AE keeps a trailing NUL in pydicom
    ds.RetrieveURL = "http://host/x "
    ds.InstitutionName = "H\u00f4pital"  # not ASCII: pydicom's path
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ReferencedImageSequence = [Dataset(), Dataset()]
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4\x00"
    ds.ReferencedImageSequence[1].ReferencedFrameNumber = ""
    ds.RescaleIntercept = ""
    ds.FrameOfReferenceUID = " 1.2.3 \\1.2.4\t"  # each UID stripped on both sides
    ds.ExposureIndex = "-9007199254740993"  # (0018,1411) DS, beyond float precision
    ds.PixelPaddingValue = 0
    ds.NumberOfFrames = "99999999999999999999"  # IS longer than PS3.5 allows
    path = write_part10(ds, tmp_path / "awkward.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = without_nul(_pydicom_json(_header(path)))
        actual = metadata_json(_header(path), has_pixel_data=False)
    assert actual == expected
    # And what a viewer reads:
    assert actual["00100010"]["Value"] == [{"Alphabetic": "DOE^JOHN"}, {"Alphabetic": "ROE^JANE"}]
    assert actual["00080008"]["Value"] == ["ORIGINAL", "", "AXIAL"]
    assert actual["00281050"]["Value"] == [40.0, -150.0]
    assert "Value" not in actual["00281052"]


def _pydicom_uid(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    return None if value is None else str(value)


def _pydicom_integer(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _pydicom_text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


# What ingest indexes and puts in events, and text VRs besides.
_TEXT_KEYWORDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
                  "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                  "StudyDescription", "ReferringPhysicianName", "Modality", "SeriesDescription",
                  "BodyPartExamined", "SeriesDate", "SeriesTime", "ImageType", "StationName",
                  "ImageComments", "RetrieveURL", "AcquisitionDateTime", "PatientAge",
                  "InstitutionName", "SOPInstanceUID", "FrameOfReferenceUID",
                  "ScheduledStudyLocationAETitle", "PerformingPhysicianName")  # fmt: skip
_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                 "FrameOfReferenceUID")  # fmt: skip
_INTEGER_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames",
                     "InstanceNumber", "SeriesNumber")  # fmt: skip


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", _readable_test_files(), ids=lambda p: p.name)
def test_raw_uid_and_integer_values_equal_pydicoms(path: Path) -> None:
    # Raw reads of a fresh header against pydicom's conversion of another.
    raw, converted = _header(path), _header(path)
    for keyword in _UID_KEYWORDS:
        assert uid_value(raw, keyword) == _pydicom_uid(converted, keyword), keyword
    for keyword in _INTEGER_KEYWORDS:
        assert integer_value(raw, keyword) == _pydicom_integer(converted, keyword), keyword
    for keyword in _TEXT_KEYWORDS:
        try:
            expected = _pydicom_text(converted, keyword)
        except Exception:
            continue  # pydicom cannot convert it; neither path is asked for a value then
        assert text_value(raw, keyword) == expected, keyword


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    ExplicitVRBigEndian])  # fmt: skip
def test_raw_values_of_awkward_elements_equal_pydicoms(tmp_path: Path, syntax: str) -> None:
    ds = ct_instance()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.StudyInstanceUID = " 1.2.3 "  # padded on both sides
    ds.SeriesInstanceUID = "1.2.3.4\x00"  # PS3.5 6.2: a NUL pads a UI
    ds.FrameOfReferenceUID = "1.2.3\\1.2.4"  # two values: pydicom's path
    ds.InstanceNumber = " -7 "
    ds.SeriesNumber = "1.0"  # not an integer string: pydicom's path (it says 1)
    ds.NumberOfFrames = ""
    ds.Rows = 512
    ds.Columns = 65535
    ds.StudyID = " 12 "  # SH: leading spaces kept, trailing dropped
    ds.ImageType = "ORIGINAL\\\\AXIAL "
    ds.PatientName = "DOE^JOHN\\ROE^JANE"  # PN: pydicom's path
    ds.StationName = " CT01 "
    ds.ImageComments = "a \\ b "
    ds.InstitutionName = "H\u00f4pital"  # not ASCII: pydicom's path
    ds.PerformingPhysicianName = "A\x00B"
    ds.ScheduledStudyLocationAETitle = "SCP1\x00"
    ds.AcquisitionDateTime = "20260101120000.5 "
    ds.PatientAge = "042Y"
    ds.SpecificCharacterSet = "ISO_IR 100"
    path = write_part10(ds, tmp_path / "awkward.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw, converted = _header(path), _header(path)
        for keyword in _UID_KEYWORDS:
            assert uid_value(raw, keyword) == _pydicom_uid(converted, keyword), keyword
        for keyword in _INTEGER_KEYWORDS:
            assert integer_value(raw, keyword) == _pydicom_integer(converted, keyword), keyword
        for keyword in _TEXT_KEYWORDS:
            assert text_value(raw, keyword) == _pydicom_text(converted, keyword), keyword
    assert uid_value(raw, "StudyInstanceUID") == "1.2.3"
    assert text_value(raw, "ImageType") == "ORIGINAL\\\\AXIAL"
    assert text_value(raw, "StudyID") == " 12"
    assert integer_value(raw, "InstanceNumber") == -7
    assert integer_value(raw, "Columns") == 65535
    assert integer_value(raw, "NumberOfFrames") is None
