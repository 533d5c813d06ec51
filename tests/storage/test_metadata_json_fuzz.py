"""Property of the DICOM JSON encoder (PS3.18 F.2), issue 17: for any value bytes a sender put in
an element of any VR, ``metadata_json`` says exactly what pydicom says (its fast path is a
shortcut, never a different answer), the result is JSON that PostgreSQL's JSONB takes (no NaN,
no infinity, no U+0000), and no value makes it raise. Data sets are written byte by byte, in
both little-endian syntaxes, so that values no writer would produce are read as received."""

from __future__ import annotations

import io
import json
import struct
import warnings

import pydicom
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.datadict import DicomDictionary

from storage.dicom_file import metadata_json
from tests.storage.test_dicom_file import _pydicom_json, without_nul

FUZZ = settings(max_examples=400, deadline=3000, derandomize=True, database=None)
# PS3.5 7.1.2: the VRs with a 4-byte length in Explicit VR.
_LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def _a_tag_per_vr() -> dict[str, int]:
    """One standard, non-retired element of each VR (group 0008 and up, single VR)."""
    tags: dict[str, int] = {}
    for tag, (vr, _vm, _name, retired, _keyword) in sorted(DicomDictionary.items()):
        if retired or tag >> 16 < 0x0008 or tag & 0xFFFF == 0 or " " in vr or vr == "SQ":
            continue
        if tag == 0x00080005:  # Specific Character Set: set on its own below
            continue
        tags.setdefault(vr, tag)
    return tags


TAGS = _a_tag_per_vr()
_TEXT_PIECES = st.sampled_from(
    ["A", "DOE^JOHN", "1.2.840", "20240131", "-1.5e2", " ", "\\", "\x00", "=", "^", "007",
     "+1", ".5", "NaN", "inf", "1e400", "99999999999999999999", "\x1b$B", "\u00e9", "\u4e2d",
     "\t", "\r\n"]
)  # fmt: skip
_VALUE = st.one_of(
    st.binary(max_size=24),
    st.lists(_TEXT_PIECES, max_size=6).map(lambda pieces: "".join(pieces).encode("utf-8")),
)
_CHARSETS = st.sampled_from([None, b"ISO_IR 100", b"ISO_IR 192", b"ISO 2022 IR 87", b"\\bogus"])


def _explicit(tag: int, vr: str, value: bytes) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if vr in _LONG_LENGTH_VRS:
        return struct.pack("<HH2sHL", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def _implicit(tag: int, _vr: str, value: bytes) -> bytes:
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _read(raw: bytes, implicit: bool) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.filereader.read_dataset(io.BytesIO(raw), implicit, True)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
        )
    return ds


@FUZZ
@given(
    values=st.dictionaries(st.sampled_from(sorted(TAGS)), _VALUE, min_size=1, max_size=6),
    charset=_CHARSETS,
    implicit=st.booleans(),
)
def test_any_element_values_encode_as_pydicom_encodes_them(
    values: dict[str, bytes], charset: bytes | None, implicit: bool
) -> None:
    elements = {TAGS[vr]: (vr, value) for vr, value in values.items()}
    if charset is not None:
        elements[0x00080005] = ("CS", charset)
    encode = _implicit if implicit else _explicit
    raw = b"".join(
        encode(tag, vr, value + b" " * (len(value) % 2))
        for tag, (vr, value) in sorted(elements.items())
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = without_nul(_pydicom_json(_read(raw, implicit)))
        actual = metadata_json(_read(raw, implicit), has_pixel_data=False)
    assert actual == expected
    text = json.dumps(actual, allow_nan=False)  # raises on NaN or an infinity
    assert "\\u0000" not in text
