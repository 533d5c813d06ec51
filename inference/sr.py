"""The TID 1500 Measurement Report (PS3.16 A.35.1) of a model's findings, as a Comprehensive 3D
SR (PS3.3 A.35.13), made with highdicom."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from inference.registry import Label, Model
from inference.seg import (
    MANUFACTURER,
    lesion_tracking_identifier,
    output_series_description,
    tracking_identifier,
)

SR_SERIES_NUMBER = 9002
OUTLINES_SERIES_NUMBER = 9004  # after the SEG (9001), the SR (9002) and reviews (9003)


@dataclass(frozen=True)
class Finding:
    """One label's finding: its size, and the SEG segment that outlines it (if any)."""

    label: Label
    tracking_uid: str
    size: float | None  # mm² (a whole slide) or mm³ (slices); None: spacing unknown
    planar: bool  # True: ``size`` is an area
    segment_number: int | None = None
    # False: the model ran and found nothing of this label; the group says "Absent".
    present: bool = True


@dataclass(frozen=True)
class LesionOutline:
    """One lesion of a found label, outlined on its key slice (inference.lesions)."""

    label: Label
    lesion_number: int
    tracking_uid: str
    key_image: Dataset  # the source slice it is outlined on
    outline: np.ndarray  # (n, 2) (column, row) vertices of a closed polyline
    area_mm2: float | None
    long_axis_mm: float | None


def measurement_report(
    model: Model,
    source_images: Sequence[Dataset],
    findings: Sequence[Finding],
    segmentation: Dataset | None,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> hd.sr.Comprehensive3DSR:
    """The report: per finding a tracking identifier and UID, finding type and site, the area
    or volume, the algorithm (TID 4019) and a reference to the SEG segment (TID 1411); per
    label found nowhere, a group that says so. ``findings`` must not be empty."""
    algorithm = _algorithm(model)
    groups = [_group(f, model, algorithm, source_images, segmentation) for f in findings]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(model),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    evidence = [*source_images, *([segmentation] if segmentation is not None else [])]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=output_series_description(model, "SR"),
    )


def outlines_report(
    model: Model,
    lesions: Sequence[LesionOutline],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> hd.sr.Comprehensive3DSR:
    """A second TID 1500 report, beside the model's measurement report, in a series of its own:
    per lesion its outline on its key slice, its area and its long axis (TID 1410), and nothing
    else. Viewers that draw only planar measurements list and draw these; OHIF 3.12 cannot open
    a report that also holds groups without a spatial coordinate (TID 1411 volumes, TID 1501
    "Absent"), such as the measurement report. ``lesions`` must not be empty."""
    algorithm = _algorithm(model)
    key_images = {lesion.key_image.SOPInstanceUID: lesion.key_image for lesion in lesions}
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(model),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=[_lesion_group(lesion, model, algorithm) for lesion in lesions],
        # TID 1600 Image Library: the key slices (viewers open the report on these).
        referenced_images=list(key_images.values()),
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(key_images.values()),
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=OUTLINES_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=output_series_description(model, "outlines"),
    )


def _algorithm(model: Model) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=model.manifest.algorithm_name, version=model.version)


def _observation_context(model: Model) -> hd.sr.ObservationContext:
    # TID 1002: the observer is the algorithm, a device whose UID derives from its identity.
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["hilum-model", model.name, model.version]),
            name=model.manifest.algorithm_name,
            manufacturer_name=MANUFACTURER,
            model_name=model.name[:64],
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=device)


class _FindingGroupArguments(TypedDict):
    """What every measurement group of a finding has, whatever its region."""

    tracking_identifier: hd.sr.TrackingIdentifier
    finding_type: Code
    finding_sites: list[hd.sr.FindingSite] | None
    algorithm_id: hd.sr.AlgorithmIdentification
    measurements: list[hd.sr.Measurement] | None


def _group(
    finding: Finding,
    model: Model,
    algorithm: hd.sr.AlgorithmIdentification,
    source_images: Sequence[Dataset],
    segmentation: Dataset | None,
) -> (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
):
    label = finding.label
    measurements = []
    if finding.size is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.Area if finding.planar else codes.SCT.Volume,
                value=float(f"{finding.size:.6g}"),  # DS holds 16 characters
                unit=codes.UCUM.SquareMillimeter if finding.planar else codes.UCUM.CubicMillimeter,
                algorithm_id=algorithm,
            )
        )
    common: _FindingGroupArguments = {
        # TID 4108: a human-readable identifier and a UID that stays with the finding.
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=finding.tracking_uid, identifier=tracking_identifier(model, label)
        ),
        "finding_type": label.finding_type.code(),
        "finding_sites": (
            [hd.sr.FindingSite(anatomic_location=label.finding_site.code())]
            if label.finding_site
            else None
        ),
        "algorithm_id": algorithm,
        "measurements": measurements or None,
    }
    if not finding.present:
        # TID 1501: a qualitative evaluation, e.g. "Lesion: Absent" (SCT 272519000).
        absent = hd.sr.QualitativeEvaluation(name=label.finding_type.code(), value=codes.SCT.Absent)
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            **common, qualitative_evaluations=[absent]
        )
    if segmentation is None or finding.segment_number is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    # TID 1411: the finding's region is the SEG segment.
    if finding.planar:
        reference = hd.sr.ReferencedSegment(
            sop_class_uid=segmentation.SOPClassUID,
            sop_instance_uid=segmentation.SOPInstanceUID,
            segment_number=finding.segment_number,
            source_images=[hd.sr.SourceImageForSegmentation.from_source_image(source_images[0])],
        )
    else:
        reference = hd.sr.ReferencedSegment(
            sop_class_uid=segmentation.SOPClassUID,
            sop_instance_uid=segmentation.SOPInstanceUID,
            segment_number=finding.segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(source_images[0].SeriesInstanceUID),
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        referenced_segment=reference, **common
    )


def _lesion_group(
    lesion: LesionOutline, model: Model, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410: the lesion's outline on its key slice as an Image Region (SCOORD POLYLINE,
    closed: first vertex = last, PS3.3 C.18.6.1.2), its area and its long axis."""
    label = lesion.label
    measurements = []
    if lesion.area_mm2 is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.Area,
                value=float(f"{lesion.area_mm2:.6g}"),
                unit=codes.UCUM.SquareMillimeter,
                algorithm_id=algorithm,
            )
        )
    if lesion.long_axis_mm is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.LongAxis,
                value=float(f"{lesion.long_axis_mm:.6g}"),
                unit=codes.UCUM.Millimeter,
                algorithm_id=algorithm,
            )
        )
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=lesion.outline,
        source_image=hd.sr.SourceImageForRegion.from_source_image(lesion.key_image),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=lesion.tracking_uid,
            identifier=lesion_tracking_identifier(model, label, lesion.lesion_number),
        ),
        referenced_region=region,
        finding_type=label.finding_type.code(),
        finding_sites=(
            [hd.sr.FindingSite(anatomic_location=label.finding_site.code())]
            if label.finding_site
            else None
        ),
        algorithm_id=algorithm,
        measurements=measurements or None,
    )
