"""The fast Identifier encoder against pydicom: the bytes of every pending C-FIND response
Identifier equal pydicom's encoding of :func:`response_identifier` for the same row."""

from __future__ import annotations

from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from server.dimse.identifier import (
    QueryRequest,
    RequestedKey,
    query_request,
    response_identifier,
)
from server.dimse.response_encoding import NotEncodable, ResponseIdentifierEncoder, Unsupported

AE_TITLE = "HILUM"
IMPLICIT_AND_EXPLICIT = pytest.mark.parametrize("implicit_vr", [True, False], ids=["ivr", "evr"])


def study_request(*, retrieve_ae_title: bool = True, level: str = "STUDY") -> QueryRequest:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for keyword in (
        "PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyDate",
        "StudyTime", "AccessionNumber", "StudyDescription", "ModalitiesInStudy",
        "SOPClassesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
        "PatientComments", "ReferringPhysicianName",
    ):  # fmt: skip
        setattr(ds, keyword, "")
    if retrieve_ae_title:
        ds.RetrieveAETitle = ""
    ds.ReferencedStudySequence = []
    ds.add_new(0x00091010, "LO", "")  # a private attribute
    ds.add_new(0x00080000, "UL", 0)  # a group length: before Specific Character Set
    sop_class = StudyRootQueryRetrieveInformationModelFind
    if level == "PATIENT":
        sop_class = PatientRootQueryRetrieveInformationModelFind
    return query_request(ds, sop_class, case_insensitive_person_names=True)


ROWS: dict[str, dict[str, Any]] = {
    "ascii": {
        "PatientName": "DOE^JANE", "PatientID": "PAT-1", "PatientBirthDate": "19700101",
        "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1", "StudyDate": "20260105",
        "StudyTime": "101500", "AccessionNumber": "ACC-101", "StudyDescription": "CT HEAD",
        "ModalitiesInStudy": ["CT", "SR"], "SOPClassesInStudy": ["1.2.840.10008.5.1.4.1.1.2"],
        "NumberOfStudyRelatedSeries": 3, "NumberOfStudyRelatedInstances": 12,
    },
    "odd-lengths": {
        "PatientName": "DOE^JOHN^X", "PatientID": "P1", "StudyInstanceUID": "1.2.3",
        "StudyDescription": "ABC", "ModalitiesInStudy": ["MR"], "SOPClassesInStudy": ["1.2"],
        "NumberOfStudyRelatedInstances": 123, "AccessionNumber": "A",
    },
    "non-ascii-name": {"PatientName": "MÜLLER^HANS", "PatientID": "PAT-4"},
    "non-ascii-description": {"StudyDescription": "Thorax ß", "PatientName": "Ωmega^X"},
    "empty-and-none": {
        "PatientName": "", "PatientID": None, "ModalitiesInStudy": [],
        "SOPClassesInStudy": None, "StudyDescription": "",
    },
    "missing": {},
    "many-values": {"ModalitiesInStudy": ["CT", "MR", "PT", "SR", "SEG"]},
}  # fmt: skip


def pydicom_bytes(request: QueryRequest, row: dict[str, Any], implicit_vr: bool) -> bytes:
    ds = response_identifier(request, row, AE_TITLE)
    return bytes(encode(ds, implicit_vr, True))


EXPECTED = {
    (name, implicit_vr): pydicom_bytes(study_request(), row, implicit_vr)
    for name, row in ROWS.items()
    for implicit_vr in (True, False)
}


@IMPLICIT_AND_EXPLICIT
@pytest.mark.parametrize("name", ROWS)
def test_identifier_bytes_equal_pydicom_encoding(name: str, implicit_vr: bool) -> None:
    """Encoded without pydicom (``encode_directly`` raises rather than hand a row to it)."""
    request = study_request()
    row = ROWS[name]
    encoder = ResponseIdentifierEncoder(request, AE_TITLE, implicit_vr=implicit_vr)
    encoded = encoder.encode_directly(row)
    assert encoded == EXPECTED[name, implicit_vr]
    decoded = decode(BytesIO(encoded), implicit_vr, True)
    assert decoded == decode(BytesIO(EXPECTED[name, implicit_vr]), implicit_vr, True)


@IMPLICIT_AND_EXPLICIT
def test_character_set_only_with_non_ascii_values(implicit_vr: bool) -> None:
    encoder = ResponseIdentifierEncoder(study_request(), AE_TITLE, implicit_vr=implicit_vr)
    ascii_response = decode(BytesIO(encoder.encode(ROWS["ascii"])), implicit_vr, True)
    assert "SpecificCharacterSet" not in ascii_response
    utf8 = decode(BytesIO(encoder.encode(ROWS["non-ascii-name"])), implicit_vr, True)
    assert utf8.SpecificCharacterSet == "ISO_IR 192"
    assert str(utf8.PatientName) == "MÜLLER^HANS"
    assert list(utf8.keys()) == sorted(utf8.keys())
    assert utf8.QueryRetrieveLevel == "STUDY" and utf8.RetrieveAETitle == AE_TITLE
    assert len(utf8.ReferencedStudySequence) == 0 and utf8[0x00091010].value in ("", None)


@IMPLICIT_AND_EXPLICIT
@pytest.mark.parametrize("level", ["PATIENT", "STUDY"])
def test_without_retrieve_ae_title_and_at_other_levels(implicit_vr: bool, level: str) -> None:
    request = study_request(retrieve_ae_title=False, level=level)
    encoder = ResponseIdentifierEncoder(request, AE_TITLE, implicit_vr=implicit_vr)
    for row in ROWS.values():
        assert encoder.encode(row) == pydicom_bytes(request, row, implicit_vr)


@IMPLICIT_AND_EXPLICIT
def test_rows_left_to_pydicom_still_equal_its_encoding(implicit_vr: bool) -> None:
    """Values the fast encoder does not write itself: the same bytes, through pydicom."""
    request = study_request()
    # An SCU that sent NumberOfStudyRelatedInstances as UL (explicit VR): an int, not text.
    tag = Tag("NumberOfStudyRelatedInstances")
    ul = RequestedKey(tag, "UL", "NumberOfStudyRelatedInstances")
    keys = tuple(ul if key.tag == tag else key for key in request.requested)
    as_ul = QueryRequest(request.query, keys)
    encoder = ResponseIdentifierEncoder(as_ul, AE_TITLE, implicit_vr=implicit_vr)
    row = ROWS["ascii"]
    with pytest.raises(NotEncodable):
        encoder.encode_directly(row)
    assert encoder.encode(row) == pydicom_bytes(as_ul, row, implicit_vr)
    # A non-ASCII value in a VR without a character set (CS).
    row = {**ROWS["ascii"], "ModalitiesInStudy": ["CT", "MÉ"]}
    encoder = ResponseIdentifierEncoder(request, AE_TITLE, implicit_vr=implicit_vr)
    with pytest.raises(NotEncodable):
        encoder.encode_directly(row)
    assert encoder.encode(row) == pydicom_bytes(request, row, implicit_vr)


def test_a_request_it_cannot_serve_is_refused() -> None:
    with pytest.raises(Unsupported):
        ResponseIdentifierEncoder(study_request(), "HÎLUM", implicit_vr=True)
