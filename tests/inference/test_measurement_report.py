"""The TID 1500 reader finds in the writer's SR what the writer put there: present findings with
their size and segment, absent ones marked absent."""

from __future__ import annotations

import pytest

from inference.measurement_report import read_findings, with_outlines
from inference.sr import measurement_report
from tests.inference.test_writers import (
    CT_MODEL,
    _finding,
    _uids,
    ct_outlines,
    ct_outputs,
    wsi_outputs,
)


def test_a_present_volume_finding_is_read_with_its_size_segment_and_algorithm() -> None:
    _, truth, seg, sr = ct_outputs()
    (finding,) = read_findings(sr)
    assert finding.present
    assert finding.finding == "Lesion" and finding.site == "Abdomen"
    assert finding.title == "Lesion in Abdomen"
    assert finding.finding_code == ("SCT", "52988006", "Lesion")
    assert finding.size == pytest.approx(float(truth.sum()) * 1.5 * 1.5 * 5.0, rel=1e-5)
    assert finding.size_name == "Volume" and finding.size_unit == "mm3"
    assert finding.segment_number == 1
    assert finding.segmentation_sop_instance_uid == seg.SOPInstanceUID
    assert finding.tracking_uid == _finding(CT_MODEL, None, False).tracking_uid
    assert finding.algorithm_name == CT_MODEL.manifest.algorithm_name
    assert finding.algorithm_version == CT_MODEL.version


def test_an_area_finding_is_read_as_an_area() -> None:
    _, _, _, sr = wsi_outputs()
    (finding,) = read_findings(sr)
    assert finding.present and finding.size_name == "Area" and finding.size_unit == "mm2"
    assert finding.finding == "Neoplasm" and finding.site == "Breast"


def test_an_absent_finding_is_read_as_absent() -> None:
    sources, _, _, _ = ct_outputs()
    absent = _finding(CT_MODEL, None, False, present=False)
    sr = measurement_report(CT_MODEL, sources, [absent], None, **_uids("absent-sr"))
    (finding,) = read_findings(sr)
    assert not finding.present
    assert finding.size is None and finding.segment_number is None
    assert finding.finding == "Lesion"


def test_a_dataset_without_content_has_no_findings() -> None:
    _, _, seg, _ = wsi_outputs()
    assert read_findings(seg) == []


def test_outlines_attach_to_the_finding_of_the_same_type_and_site() -> None:
    _, _, _, sr = ct_outputs()
    _, _, outlines = ct_outlines()
    lesions = read_findings(outlines)
    assert lesions and all(o.long_axis_mm and o.key_image_sop_instance_uid for o in lesions)

    (finding,) = with_outlines(read_findings(sr), lesions)

    assert finding.outlines == tuple(lesions)
    assert finding.long_axis_mm is None and finding.key_image_sop_instance_uid == ""
    # An absent finding has no outlines, whatever the other report holds.
    absent = measurement_report(
        CT_MODEL, ct_outputs()[0], [_finding(CT_MODEL, None, False, present=False)], None,
        **_uids("absent-outlines"),
    )  # fmt: skip
    (nothing,) = with_outlines(read_findings(absent), lesions)
    assert nothing.outlines == ()
