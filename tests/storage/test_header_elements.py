"""Hilum's own header read (``storage/header_elements.py``) against pydicom's
``dcmread(stop_before_pixels=True)``: where it reads a file, the data set is pydicom's, and what
ingest stores from it (the instance's DICOM JSON, the index columns, the event payload) is
byte for byte the same; where it does not, pydicom reads the file."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from storage.dicom_file import integer_value, metadata_json, read_instance_header, uid_value
from storage.header_elements import read_header
from storage.ingest import _text
from tests import hostile_files
from tests.factories import ct_instance, write_part10
from tests.storage.test_header_fuzz import _MUTATION, _mutate

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

# What ingest reads from a header (storage/ingest.py, storage/dicom_file.py).
_TEXTS = {
    "PatientID": 64, "IssuerOfPatientID": 64, "PatientName": 324, "PatientBirthDate": 8,
    "PatientSex": 16, "StudyDate": 8, "StudyTime": 16, "AccessionNumber": 16, "StudyID": 16,
    "StudyDescription": 64, "ReferringPhysicianName": 324, "Modality": 16,
    "SeriesDescription": 64, "BodyPartExamined": 16, "SeriesDate": 8, "SeriesTime": 16,
}  # fmt: skip
_INTEGERS = ("InstanceNumber", "SeriesNumber", "NumberOfFrames", "Rows", "Columns",
             "SamplesPerPixel", "BitsAllocated")  # fmt: skip
_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _stored(dataset: Dataset) -> dict[str, Any]:
    """What ingest writes from a header: the DICOM JSON as serialised, index columns, UIDs."""
    return {
        "json": json.dumps(metadata_json(dataset, has_pixel_data=False)),
        "texts": {keyword: _text(dataset, keyword, size) for keyword, size in _TEXTS.items()},
        "integers": {keyword: integer_value(dataset, keyword) for keyword in _INTEGERS},
        "uids": {keyword: uid_value(dataset, keyword) for keyword in _UIDS},
    }


def _pydicom_read(path: Path) -> tuple[Dataset, int]:
    with open(path, "rb") as fp:
        dataset = pydicom.dcmread(fp, stop_before_pixels=True)
        return dataset, fp.tell()


def _our_read(path: Path) -> tuple[Dataset, int] | None:
    with open(path, "rb") as fp:
        return read_header(fp)


def _assert_same_element(ours: Any, theirs: Any) -> None:
    assert type(ours) is type(theirs)
    if isinstance(theirs, RawDataElement):
        assert ours == theirs  # tag, VR, length, value bytes, value offset, encoding
        return
    assert (ours.tag, ours.VR, ours.file_tell, ours.is_undefined_length) == (
        theirs.tag,
        theirs.VR,
        theirs.file_tell,
        theirs.is_undefined_length,
    )
    if isinstance(theirs.value, Sequence):
        assert len(ours.value) == len(theirs.value)
        for our_item, their_item in zip(ours.value, theirs.value, strict=True):
            _assert_same_data_set(our_item, their_item)
    else:
        assert ours.value == theirs.value


def _assert_same_data_set(ours: Dataset, theirs: Dataset) -> None:
    assert list(ours.keys()) == list(theirs.keys())
    for tag in theirs.keys():  # noqa: SIM118 - iterating a Dataset converts every element
        _assert_same_element(
            ours.get_item(tag, keep_deferred=True), theirs.get_item(tag, keep_deferred=True)
        )
    assert ours.original_encoding == theirs.original_encoding
    assert ours.original_character_set == theirs.original_character_set


def _assert_reads_as_pydicom(path: Path) -> bool:
    """Whether Hilum's read took the file; if it did, that it equals pydicom's."""
    ours = _our_read(path)
    if ours is None:
        return False
    theirs, stopped_at = _pydicom_read(path)
    dataset, at = ours
    assert at == stopped_at
    assert type(dataset) is type(theirs)
    _assert_same_data_set(dataset, theirs)
    assert list(dataset.file_meta.keys()) == list(theirs.file_meta.keys())
    assert dataset.file_meta == theirs.file_meta  # converted values (pydicom converts some)
    assert dataset.file_meta.original_encoding == theirs.file_meta.original_encoding
    assert (dataset.preamble, dataset.filename) == (theirs.preamble, theirs.filename)
    assert _stored(dataset) == _stored(theirs)
    return True


def _pydicom_files() -> list[Path]:
    return sorted(PYDICOM_TEST_FILES.rglob("*.dcm"))


@pytest.mark.filterwarnings("ignore")
def test_every_pydicom_test_file_reads_as_pydicom_reads_it() -> None:
    walked = [path.name for path in _pydicom_files() if _assert_reads_as_pydicom(path)]
    # Most of pydicom's files are little endian Part 10 files: the walk must take them.
    assert len(walked) > 40, walked


def _hilum_files(folder: Path) -> list[Path]:
    """Hilum's test data in both little-endian transfer syntaxes, sequences (defined and
    undefined length, nested), character sets, private and empty elements included."""
    paths = []
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds = ct_instance(seed=3)
        ds.file_meta.TransferSyntaxUID = syntax
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jürgen"
        ds.StudyDescription = ""
        ds.ReferringPhysicianName = ""
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D4000", "SRT", "Abd"
        inner = Dataset()
        inner.ReferencedSOPClassUID = ds.SOPClassUID
        inner.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        item.ReferencedImageSequence = [inner]
        ds.AnatomicRegionSequence = [item]
        ds.ProcedureCodeSequence = []
        block = ds.private_block(0x0011, "HILUM TEST", create=True)
        block.add_new(0x01, "LO", "private value")
        block.add_new(0x02, "OB", b"\x01\x02\x03\x04")
        name = "explicit" if syntax == ExplicitVRLittleEndian else "implicit"
        paths.append(write_part10(ds, folder / f"{name}.dcm"))
        # The same with every sequence of defined length.
        defined = folder / f"{name}-defined.dcm"
        ds.AnatomicRegionSequence.is_undefined_length = False
        ds["AnatomicRegionSequence"].is_undefined_length = False
        paths.append(write_part10(ds, defined))
    rle = ct_instance(seed=4)
    rle.compress(RLELossless)
    paths.append(write_part10(rle, folder / "rle.dcm"))
    paths.append(hostile_files.nested_sequences(folder / "nested.dcm", 5))
    paths.append(hostile_files.many_items(folder / "items.dcm", 50))
    paths.append(hostile_files.jpeg_claiming(folder / "jpeg.dcm", 16, 16, 2))
    paths.append(hostile_files.small_deflated(folder / "deflated.dcm"))
    return paths


def test_hilum_test_data_reads_as_pydicom_reads_it(tmp_path: Path) -> None:
    paths = _hilum_files(tmp_path)
    walked = {path.name for path in paths if _assert_reads_as_pydicom(path)}
    # Deflated data sets are pydicom's; everything else is walked.
    assert walked == {path.name for path in paths} - {"deflated.dcm"}


def test_header_read_by_ingest_equals_pydicoms(tmp_path: Path) -> None:
    """read_instance_header, through Hilum's read, against the same checks on pydicom's."""
    for path in _hilum_files(tmp_path):
        if path.name == "deflated.dcm":
            continue
        header = read_instance_header(path)
        theirs, _ = _pydicom_read(path)
        assert header.transfer_syntax_uid == theirs.file_meta.TransferSyntaxUID
        assert header.sop_instance_uid == theirs.SOPInstanceUID
        assert json.dumps(metadata_json(header.dataset, header.has_pixel_data)) == json.dumps(
            metadata_json(theirs, header.has_pixel_data)
        )


def test_files_the_walk_leaves_to_pydicom(tmp_path: Path) -> None:
    ds = ct_instance()
    path = write_part10(ds, tmp_path / "ct.dcm")
    data = path.read_bytes()
    meta_end = 144 + struct.unpack("<L", data[140:144])[0]
    cases = {
        "no preamble": data[128:],
        "cut inside a value": data[: meta_end + 8 + 3],  # Image Type, 3 bytes of its value
        "group length wrong": data[:140] + struct.pack("<L", meta_end - 140) + data[144:],
        "unknown VR": data[: meta_end + 4] + b"ZZ" + data[meta_end + 6 :],
    }
    for name, content in cases.items():
        case = tmp_path / f"{name}.dcm"
        case.write_bytes(content)
        with open(case, "rb") as fp:
            assert read_header(fp) is None, name


@settings(
    max_examples=300,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(seed=st.integers(0, 8), mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_files_read_as_pydicom_reads_them_or_are_left_to_it(
    tmp_path: Path, seed: int, mutations: list[tuple[str, int, int]]
) -> None:
    """Differential: whatever the bytes, Hilum's read is pydicom's or None; where pydicom
    raises (a warning counted as an error too), Hilum's read is None."""
    folder = tmp_path / "seeds"
    folder.mkdir(exist_ok=True)
    seeds = sorted(folder.glob("*.dcm")) or _hilum_files(folder)
    path = tmp_path / "mutated.dcm"
    path.write_bytes(_mutate(seeds[seed % len(seeds)].read_bytes(), mutations))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            _pydicom_read(path)
        except Exception:
            assert _our_read(path) is None
            return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_reads_as_pydicom(path)
