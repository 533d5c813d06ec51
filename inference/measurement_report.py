"""Reading the findings back out of a TID 1500 Measurement Report (PS3.16 A.35.1).

The content tree is walked by concept codes, with pydicom only, so any TID 1500 SR is read the
same way, whether Hilum's worker or another system wrote it: the root container (126000), its
Imaging Measurements (126010), and in each Measurement Group (125007, TID 1501 / 1411 / 1410)
the Tracking Identifier and UID (TID 4108), the Finding and Finding Site, the area or volume
(NUM), a qualitative evaluation of "Absent", the algorithm (TID 4019), the Referenced Segment, and
for a planar ROI (TID 1410) its long axis and the image its outline (SCOORD) is drawn on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from pydicom.dataset import Dataset

from storage.jobs import JobFinding

# (coding scheme, code value) of the concepts read here (PS3.16 Annex D, SNOMED CT).
MEASUREMENT_GROUP = ("DCM", "125007")
TRACKING_IDENTIFIER = ("DCM", "112039")
TRACKING_UID = ("DCM", "112040")
FINDING = ("DCM", "121071")
FINDING_SITE = ("SCT", "363698007")
ALGORITHM_NAME = ("DCM", "111001")
ALGORITHM_VERSION = ("DCM", "111003")
REFERENCED_SEGMENT = ("DCM", "121191")
ABSENT = ("SCT", "272519000")
LONG_AXIS = ("SCT", "103339001")
IMAGE_REGION = ("DCM", "111030")


@dataclass(frozen=True)
class ReportedFinding:
    """One measurement group of the report, as a reader sees it."""

    tracking_uid: str
    tracking_identifier: str
    finding: str  # code meaning of the Finding, e.g. "Lesion"
    site: str  # code meaning of the Finding Site, "" if none
    present: bool  # False: a qualitative evaluation says "Absent"
    size: float | None
    size_name: str  # "Volume", "Area", ...
    size_unit: str  # UCUM, e.g. "mm3"
    algorithm_name: str
    algorithm_version: str
    segment_number: int | None  # the SEG segment that outlines it
    segmentation_sop_instance_uid: str
    # (coding scheme designator, code value, code meaning) of the Finding and its site.
    finding_code: tuple[str, str, str] | None = None
    site_code: tuple[str, str, str] | None = None
    # A planar ROI (TID 1410): its long axis, and the image its outline is drawn on.
    long_axis_mm: float | None = None
    key_image_sop_instance_uid: str = ""
    # The planar outlines of this finding's lesions (each a TID 1410 group), if any
    # (``with_outlines``).
    outlines: tuple[ReportedFinding, ...] = ()

    @property
    def title(self) -> str:
        return f"{self.finding} in {self.site}" if self.site else self.finding


def _concept(item: Dataset, attribute: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    codes = item.get(attribute)
    if not codes:
        return ("", "")
    return (str(codes[0].get("CodingSchemeDesignator", "")), str(codes[0].get("CodeValue", "")))


def _code(item: Dataset) -> tuple[str, str, str] | None:
    codes = item.get("ConceptCodeSequence")
    if not codes:
        return None
    code = codes[0]
    return (
        str(code.get("CodingSchemeDesignator", "")),
        str(code.get("CodeValue", "")),
        str(code.get("CodeMeaning", "")),
    )


def _walk(items: list[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(list(item.get("ContentSequence", [])))


def read_findings(report: Dataset) -> list[ReportedFinding]:
    """Every measurement group of ``report`` (a TID 1500 SR), in document order."""
    groups = [
        item
        for item in _walk(list(report.get("ContentSequence", [])))
        if item.get("ValueType") == "CONTAINER" and _concept(item) == MEASUREMENT_GROUP
    ]
    return [_finding(group) for group in groups]


def with_outlines(
    findings: list[ReportedFinding], outlines: list[ReportedFinding]
) -> list[ReportedFinding]:
    """``findings`` (of a measurement report), each with the ``outlines`` (planar ROIs, TID
    1410, of another report of the same job) of the same finding type and site: the lesions of
    a segmented finding, outlined on their key slices."""
    return [
        replace(
            finding,
            outlines=tuple(
                o
                for o in outlines
                if finding.present
                and (o.finding_code, o.site_code) == (finding.finding_code, finding.site_code)
            ),
        )
        for finding in findings
    ]


def _finding(group: Dataset) -> ReportedFinding:
    values: dict[str, str] = {}
    codes: dict[str, tuple[str, str, str] | None] = {}
    present = True
    size: float | None = None
    size_name = size_unit = segmentation = ""
    segment: int | None = None
    long_axis: float | None = None
    key_image = ""
    for item in _walk(list(group.get("ContentSequence", []))):
        concept, kind = _concept(item), item.get("ValueType")
        if kind == "NUM" and concept == LONG_AXIS and item.get("MeasuredValueSequence"):
            long_axis = float(item.MeasuredValueSequence[0].NumericValue)
            continue
        if kind == "TEXT" and concept in (TRACKING_IDENTIFIER, ALGORITHM_NAME, ALGORITHM_VERSION):
            values.setdefault(concept[1], str(item.TextValue))
        elif kind == "UIDREF" and concept == TRACKING_UID:
            values.setdefault(concept[1], str(item.UID))
        elif kind == "CODE" and concept in (FINDING, FINDING_SITE):
            codes.setdefault(concept[1], _code(item))
        elif kind == "CODE" and _concept(item, "ConceptCodeSequence") == ABSENT:
            present = False  # TID 1501 qualitative evaluation: "<finding>: Absent"
        elif kind == "NUM" and size is None and item.get("MeasuredValueSequence"):
            measured = item.MeasuredValueSequence[0]
            size = float(measured.NumericValue)
            size_name = str(item.ConceptNameCodeSequence[0].CodeMeaning)
            units = measured.get("MeasurementUnitsCodeSequence")
            size_unit = str(units[0].CodeValue) if units else ""
        elif kind == "SCOORD" and concept == IMAGE_REGION:
            for source in item.get("ContentSequence", []):  # SELECTED FROM the image
                if source.get("ReferencedSOPSequence"):
                    key_image = str(source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif kind == "IMAGE" and concept == REFERENCED_SEGMENT:
            reference = item.ReferencedSOPSequence[0]
            segmentation = str(reference.ReferencedSOPInstanceUID)
            numbers = reference.get("ReferencedSegmentNumber")
            if numbers is not None:  # US, one value here; a list for a multi-segment reference
                segment = int(numbers) if isinstance(numbers, int) else int(numbers[0])
    return ReportedFinding(
        tracking_uid=values.get(TRACKING_UID[1], ""),
        tracking_identifier=values.get(TRACKING_IDENTIFIER[1], ""),
        finding=(codes.get(FINDING[1]) or ("", "", ""))[2],
        site=(codes.get(FINDING_SITE[1]) or ("", "", ""))[2],
        present=present,
        size=size,
        size_name=size_name,
        size_unit=size_unit,
        algorithm_name=values.get(ALGORITHM_NAME[1], ""),
        algorithm_version=values.get(ALGORITHM_VERSION[1], ""),
        segment_number=segment,
        segmentation_sop_instance_uid=segmentation,
        finding_code=codes.get(FINDING[1]),
        site_code=codes.get(FINDING_SITE[1]),
        long_axis_mm=long_axis,
        key_image_sop_instance_uid=key_image,
    )


def job_finding(report_sop_instance_uid: str, finding: ReportedFinding) -> JobFinding:
    """``finding`` of the report ``report_sop_instance_uid`` as the index keeps it."""
    code = finding.finding_code
    return JobFinding(
        report_sop_instance_uid=report_sop_instance_uid,
        tracking_uid=finding.tracking_uid,
        tracking_identifier=finding.tracking_identifier[:64],
        finding=finding.finding[:64],
        finding_code=f"{code[0]}:{code[1]}"[:64] if code else "",
        site=finding.site[:64],
        present=finding.present,
        size=finding.size,
        size_unit=finding.size_unit[:16],
        segment_number=finding.segment_number,
        segmentation_sop_instance_uid=finding.segmentation_sop_instance_uid,
    )
