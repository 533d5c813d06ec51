"""Accept header negotiation (PS3.18 8.7), pure logic."""

from __future__ import annotations

import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from server.dicomweb.media_types import (
    OCTET_STREAM,
    NotAcceptable,
    frame_representation,
    instance_transfer_syntax,
    parse_accept,
)


def test_parse_accept_orders_by_quality_and_reads_parameters() -> None:
    accepted = parse_accept(
        'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.5, '
        'multipart/related; type="image/x-jls", image/png;q=0'
    )
    assert [(a.media_type, a.transfer_syntax, a.quality) for a in accepted] == [
        ("image/jls", None, 1.0),
        ("application/dicom", "*", 0.5),
    ]
    assert parse_accept(None)[0].media_type == "*/*"


@pytest.mark.parametrize(
    ("accept", "stored", "expected"),
    [
        (None, JPEGBaseline8Bit, JPEGBaseline8Bit),  # no Accept: as stored
        ('multipart/related; type="application/dicom"', ImplicitVRLittleEndian,
         ExplicitVRLittleEndian),  # PS3.18 8.7.3.5.2 default
        ('multipart/related; type="application/dicom"; transfer-syntax=*', JPEGBaseline8Bit,
         JPEGBaseline8Bit),
        (f'multipart/related; type="application/dicom"; transfer-syntax={RLELossless}',
         ExplicitVRLittleEndian, RLELossless),
        (f'multipart/related; type="application/dicom"; transfer-syntax={JPEGBaseline8Bit}, '
         f'multipart/related; type="application/dicom"; transfer-syntax={JPEG2000Lossless}',
         ExplicitVRLittleEndian, JPEG2000Lossless),  # lossy encoding is never offered
    ],
)  # fmt: skip
def test_instance_transfer_syntax(accept: str | None, stored: str, expected: str) -> None:
    assert instance_transfer_syntax(parse_accept(accept), stored) == expected


def test_instance_transfer_syntax_not_acceptable() -> None:
    accepted = parse_accept(
        f'multipart/related; type="application/dicom"; transfer-syntax={JPEGBaseline8Bit}'
    )
    with pytest.raises(NotAcceptable):
        instance_transfer_syntax(accepted, ExplicitVRLittleEndian)
    with pytest.raises(NotAcceptable):
        instance_transfer_syntax(parse_accept("application/dicom+json"), ExplicitVRLittleEndian)


@pytest.mark.parametrize(
    ("accept", "stored", "expected"),
    [
        (None, JPEGBaseline8Bit, ("image/jpeg", False, JPEGBaseline8Bit)),
        ("*/*", JPEGBaseline8Bit, ("image/jpeg", False, JPEGBaseline8Bit)),
        ("multipart/*", RLELossless, ("image/dicom-rle", False, RLELossless)),
        ('multipart/related; type="application/octet-stream"', JPEGBaseline8Bit,
         (OCTET_STREAM, True, None)),
        ('multipart/related; type="application/octet-stream"', ExplicitVRLittleEndian,
         (OCTET_STREAM, False, None)),
        ('multipart/related; type="image/*"', RLELossless, ("image/dicom-rle", False, RLELossless)),
        # OHIF: the stored bytes, labelled octet-stream with the stored transfer syntax.
        ('multipart/related; type="application/octet-stream"; transfer-syntax=*',
         JPEGBaseline8Bit, (OCTET_STREAM, False, JPEGBaseline8Bit)),
        ('multipart/related; type="application/octet-stream"; transfer-syntax=*',
         RLELossless, (OCTET_STREAM, False, RLELossless)),
    ],
)  # fmt: skip
def test_frame_representation(accept: str | None, stored: str, expected: tuple) -> None:
    representation = frame_representation(parse_accept(accept), stored)
    assert (representation.media_type, representation.decode, representation.transfer_syntax) == (
        expected
    )


def test_star_star_accepts_instances_as_stored() -> None:
    assert instance_transfer_syntax(parse_accept("*/*"), JPEGBaseline8Bit) == JPEGBaseline8Bit
    assert instance_transfer_syntax(parse_accept("multipart/*"), RLELossless) == RLELossless


def test_native_frames_are_not_encoded() -> None:
    with pytest.raises(NotAcceptable):
        frame_representation(
            parse_accept('multipart/related; type="image/jpeg"'), ExplicitVRLittleEndian
        )
