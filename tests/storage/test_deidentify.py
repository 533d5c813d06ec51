"""De-identification (PS3.15 Annex E) checked against Table E.1-1, attribute by attribute.

The table is the standard's (``storage.confidentiality_profile``); each row's expectation is
derived here from its action code, not from the implementation: X absent, Z empty, D a value
other than the original, K the original, U the project's mapping of the original UID, C a date
moved by the patient's shift or a descriptor without the identifiers.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import DATA_ROOT
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

from inference.phantoms import synthetic_ct_series, synthetic_wsi
from storage.confidentiality_profile import (
    BASIC_ACTIONS,
    ROWS_BY_TAG,
    TABLE_E_1_1,
    ProfileRow,
)
from storage.confidentiality_profile import (
    OPTIONS as TABLE_OPTIONS,
)
from storage.deidentify import (
    METHOD_CODES,
    OPTIONS,
    Deidentifier,
    HeldBack,
    deidentify,
    patient_identity,
)
from tests.factories import ct_instance

PROJECT = Deidentifier("lung", b"0123456789abcdef-lung-secret", frozenset({"US", "SC"}))
OTHER_PROJECT = Deidentifier("heart", b"0123456789abcdef-heart-secret")
NAME = "SMITHSON^JOHANNA"
PATIENT_ID = "MRN-77881"


def _value(vr: str, index: int) -> object:
    """An identifying-looking value of ``vr``, distinct per row."""
    return {
        "DA": "20200115",
        "DT": "20200115101500",
        "TM": "101500",
        "UI": f"1.2.826.0.1.3680043.10.1.{index}",
        "PN": NAME,
        "AS": "042Y",
        "DS": "1.5",
        "IS": "7",
        "US": 7,
        "SS": 7,
        "AE": "STATION7",
        "CS": "SMITHSON",
        "UR": "http://example.org/smithson",
        "OB": b"SMITHSON",
        "UN": b"SMITHSON",
    }.get(vr, f"SMITHSON JOHANNA {PATIENT_ID} 1234567 row {index}")


def _nested_item(index: int) -> Dataset:
    item = Dataset()
    item.PatientName = NAME
    item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.10.2.{index}"
    item.CodeValue = "T-12345"
    return item


def _full_data_set() -> Dataset:
    """A data set holding every single-tag row of Table E.1-1, plus a curve and an overlay."""
    ds = Dataset()
    for index, (tag, _row) in enumerate(sorted(ROWS_BY_TAG.items())):
        vr = dictionary_VR(tag).split(" or ")[0]
        if vr == "SQ":
            ds.add_new(tag, vr, Sequence([_nested_item(index)]))
        else:
            ds.add_new(tag, vr, _value(vr, index))
    ds.PatientID = PATIENT_ID
    ds.IssuerOfPatientID = "HOSPITAL"
    ds.PatientName = NAME
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # not in the table: a class, kept
    ds.Modality = "CT"
    ds.BurnedInAnnotation = "NO"
    ds.add_new(0x50000010, "US", 3)  # Curve: Number of Points
    ds.add_new(0x60003000, "OW", b"\x01\x02")  # Overlay Data
    ds.add_new(0x60000010, "US", 1)  # Overlay Rows
    ds.add_new(0x00091001, "LO", "private SMITHSON")
    return ds


@pytest.fixture(scope="module")
def full() -> tuple[Dataset, Dataset]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's complaints about the test values' lengths
        original = _full_data_set()
        deidentified = copy.deepcopy(original)
        deidentify(deidentified, PROJECT)
    return original, deidentified


def _shift(original: Dataset) -> timedelta:
    return PROJECT.date_shift(patient_identity(original))


def _shifted(value: str, shift: timedelta) -> str:
    moved = date(int(value[:4]), int(value[4:6]), int(value[6:8])) + shift
    return moved.strftime("%Y%m%d") + value[8:]


def _check_row(row: ProfileRow, tag: int, before: Dataset, after: Dataset, shift: timedelta):
    """Asserts that ``after`` handled ``tag`` as ``row`` of Table E.1-1 says."""
    action = row.action(OPTIONS)
    name = f"{row.name} {row.tag} ({action})"
    if tag not in before:
        return
    original = before[tag]
    if action == "X":
        assert tag not in after, f"{name} should be removed"
        return
    assert tag in after, f"{name} should be present"
    new = after[tag]
    if tag in (0x00100010, 0x00100020):  # Patient's Name (Z), Patient ID (Z/D): the pseudonym
        assert str(new.value).rstrip("^") == PROJECT.pseudonym(patient_identity(before)), name
        return
    if action in ("Z", "X/Z"):
        assert new.value in (None, "", b"") or len(new.value) == 0, f"{name} should be empty"
    elif action in ("D", "Z/D", "X/D", "X/Z/D"):
        if original.VR == "SQ":
            _check_item(new.value[0], original.value[0], name)
        else:
            assert new.value not in (None, "", b""), f"{name} needs a non-empty dummy"
            assert new.value != original.value, f"{name} keeps its original value"
    elif action == "K":
        if original.VR == "SQ":
            _check_item(new.value[0], original.value[0], name)
        else:
            assert new.value == original.value, f"{name} should be kept"
    elif action == "U":
        assert new.value == PROJECT.new_uid(original.value), f"{name} not mapped"
        assert re.fullmatch(r"2\.25\.\d{1,39}", new.value) and len(new.value) <= 64
    elif action == "X/Z/U*":
        _check_item(new.value[0], original.value[0], name)
    elif action == "C":
        if original.VR in ("DA", "DT"):
            assert new.value == _shifted(original.value, shift), f"{name} not shifted"
        elif original.VR == "TM":
            assert new.value == original.value, f"{name}: whole-day shift keeps the time"
        elif original.VR == "SQ":
            _check_item(new.value[0], original.value[0], name)
        else:
            text = str(new.value)
            for identifier in ("SMITHSON", "JOHANNA", PATIENT_ID, "1234567"):
                assert identifier not in text.upper(), f"{name} still says {identifier}"
    else:
        pytest.fail(f"{name}: no expectation for the action")


def _check_item(new: Dataset, original: Dataset, name: str) -> None:
    """A sequence item kept (K, D or U* on a sequence) is de-identified itself."""
    assert new.get("PatientName") in (None, ""), f"{name}: the name inside its item stays"
    assert new.ReferencedSOPInstanceUID == PROJECT.new_uid(original.ReferencedSOPInstanceUID)
    assert new.CodeValue == original.CodeValue, f"{name}: codes inside are kept"


def test_the_table_is_the_whole_of_e_1_1() -> None:
    # PS3.15 2024e Table E.1-1 has 621 rows; the private-attributes row is applied by group.
    assert len(TABLE_E_1_1) == 620 and len(ROWS_BY_TAG) == 617
    assert {row.basic for row in TABLE_E_1_1} <= BASIC_ACTIONS
    assert {"retain_modified_dates", "clean_descriptors"} <= set(TABLE_OPTIONS)


@pytest.mark.parametrize("tag", sorted(ROWS_BY_TAG), ids=lambda t: keyword_for_tag(t) or f"{t:08X}")
def test_basic_profile_attribute(tag: int, full: tuple[Dataset, Dataset]) -> None:
    original, deidentified = full
    _check_row(ROWS_BY_TAG[tag], tag, original, deidentified, _shift(original))


def test_repeating_groups_and_private_attributes_are_removed(
    full: tuple[Dataset, Dataset],
) -> None:
    _, deidentified = full
    for tag in (0x50000010, 0x60003000, 0x60000010, 0x00091001, 0x00090010):
        assert tag not in deidentified


def test_method_is_recorded(full: tuple[Dataset, Dataset]) -> None:
    _, ds = full
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethod
    codes = [
        (item.CodeValue, item.CodingSchemeDesignator)
        for item in ds.DeidentificationMethodCodeSequence
    ]
    assert codes == [(value, "DCM") for value, _ in METHOD_CODES]
    assert {"113100", "113107", "113105"} == {value for value, _ in codes}
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"


def _all_strings(ds: Dataset) -> list[str]:
    found: list[str] = []
    for element in ds.iterall():
        if element.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or element.value is None:
            continue
        values = (
            element.value
            if element.VR != "PN" and isinstance(element.value, list)
            else [element.value]
        )
        found += [str(v) for v in values]
    return found


def _test_files() -> list[tuple[str, Callable[[], Dataset]]]:
    """pydicom's test images and the reference phantoms (a CT slice, a whole-slide image)."""

    def read(path: str) -> Callable[[], Dataset]:
        def load() -> Dataset:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # some of pydicom's files are invalid on purpose
                return dcmread(path)

        return load

    files = []
    # The files pydicom ships (get_testdata_files would also try to download the others).
    for path in sorted(map(str, (Path(DATA_ROOT) / "test_files").glob("*.dcm"))):
        try:
            ds = read(path)()
        except Exception:
            continue
        if "SOPInstanceUID" in ds and "PixelData" in ds:
            files.append((path.rsplit("/", 1)[-1], read(path)))
    files.append(("phantom-ct", lambda: synthetic_ct_series(4, slices=1, size=16)[0][0]))
    files.append(("phantom-wsi", lambda: synthetic_wsi(4, size=256, tile_size=128)[0]))
    return files


TEST_FILES = _test_files()


@pytest.mark.parametrize("load", [f for _, f in TEST_FILES], ids=[n for n, _ in TEST_FILES])
def test_every_table_attribute_of_test_images(load: Callable[[], Dataset]) -> None:
    """Every pydicom test image and the reference phantoms: each Table E.1-1 attribute it
    carries is handled as the table says, no private attribute nor original UID nor identifier
    stays, and the pixel data are the same bytes; ultrasound and secondary capture (this
    project's held-back modalities) and burned-in images are held back."""
    original, ds = load(), load()
    if ds.get("Modality") in PROJECT.held_back_modalities or ds.get("BurnedInAnnotation") == "YES":
        with pytest.raises(HeldBack):
            deidentify(ds, PROJECT)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deidentify(ds, PROJECT)
    assert ds.PixelData == original.PixelData
    shift = _shift(original)
    checked = 0
    for tag, row in ROWS_BY_TAG.items():
        if tag in original and original[tag].VR != "SQ" and original[tag].value not in (None, ""):
            _check_row(row, tag, original, ds, shift)
            checked += 1
    assert checked >= 1  # the SOP Instance UID at least (some test files hold little more)
    assert not [e for e in ds.iterall() if e.tag.is_private]
    original_uids = (
        {str(e.value) for e in original.iterall() if e.VR == "UI" and e.value}
        - set(UID_dictionary)
        - {str(original.SOPClassUID)}
    )
    remaining = set(_all_strings(ds)) & original_uids
    assert not remaining, f"original UIDs left: {remaining}"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
        value = str(original.get(keyword, "") or "")
        if len(value) >= 3:
            assert value not in _all_strings(ds), f"{keyword} {value!r} left"
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_burned_in_annotation_is_held_back() -> None:
    ds = ct_instance()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(HeldBack, match="Burned In Annotation"):
        deidentify(ds, PROJECT)
    ds = ct_instance(modality="US")
    ds.BurnedInAnnotation = "NO"
    with pytest.raises(HeldBack, match="held_back_modalities"):
        deidentify(ds, PROJECT)
    deidentify(ds, OTHER_PROJECT)  # a setting without US: released
    ds = ct_instance()
    ds.RecognizableVisualFeatures = "YES"
    with pytest.raises(HeldBack, match="Recognizable Visual Features"):
        deidentify(ds, PROJECT)


def _phantom_study(seed: int, project: Deidentifier) -> list[Dataset]:
    datasets, _ = synthetic_ct_series(seed, slices=4, size=16)
    for ds in datasets:
        deidentify(ds, project)
    return datasets


def test_phantom_structure_is_kept_under_new_uids() -> None:
    originals, _ = synthetic_ct_series(3, slices=4, size=16)
    first = _phantom_study(3, PROJECT)
    again = _phantom_study(3, PROJECT)
    other = _phantom_study(3, OTHER_PROJECT)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[key].value for ds in first}) == 1  # one study, one series, still
        assert first[0][key].value != originals[0][key].value
        assert first[0][key].value == again[0][key].value  # stable across runs
        assert first[0][key].value != other[0][key].value  # differs between projects
    sop = [ds.SOPInstanceUID for ds in first]
    assert len(set(sop)) == 4 and sop == [ds.SOPInstanceUID for ds in again]
    assert not set(sop) & {ds.SOPInstanceUID for ds in other}
    for before, after in zip(originals, first, strict=True):
        assert after.PixelData == before.PixelData
        assert np.array_equal(after.pixel_array, before.pixel_array)
        assert after.InstanceNumber == before.InstanceNumber
        assert after.PatientID == first[0].PatientID != before.PatientID
        assert after.Modality == "CT" and after.BodyPartExamined == "ABDOMEN"


def test_dates_shift_by_the_same_amount_within_a_patient() -> None:
    a = ct_instance(patient_id="P-1")
    b = ct_instance(patient_id="P-1")
    b.StudyDate, b.SeriesDate, b.AcquisitionDateTime = "20210301", "20210301", "20210301120000"
    c = ct_instance(patient_id="P-2")
    before = [copy.deepcopy(ds) for ds in (a, b, c)]
    for ds in (a, b, c):
        deidentify(ds, PROJECT)

    def day(value: str) -> date:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8]))

    shifts = [day(x.StudyDate) - day(y.StudyDate) for x, y in zip((a, b, c), before, strict=True)]
    assert shifts[0] == shifts[1] and shifts[0].days < 0
    assert shifts[2] != shifts[0]  # another patient, another shift (for these two IDs)
    assert day(b.SeriesDate) - day("20210301") == shifts[0]
    assert b.AcquisitionDateTime == _shifted("20210301120000", shifts[0])
    assert day(b.StudyDate) - day(a.StudyDate) == day("20210301") - day("20260115")
    assert a.PatientID == b.PatientID != c.PatientID
    assert a.get("PatientBirthDate") in (None, "")


def test_clean_descriptors_keep_meaning_without_identifiers() -> None:
    ds = ct_instance(patient_id="MRN123456")
    ds.PatientName = "DOE^JANE"
    ds.StudyDescription = "CT abdomen Jane Doe MRN123456"
    ds.SeriesDescription = "Axial 5mm"
    deidentify(ds, PROJECT)
    assert ds.StudyDescription == "CT abdomen"
    assert ds.SeriesDescription == "Axial 5mm"
