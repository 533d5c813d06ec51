"""The DICOM Segmentation (PS3.3 A.51) of a model's findings, made with highdicom."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.registry import Label, Model

SEG_SERIES_NUMBER = 9001  # result series sort after the scanner's own
MANUFACTURER = "Hilum"


def algorithm_identification(model: Model) -> hd.AlgorithmIdentificationSequence:
    # PS3.3 C.8.20.2: Segment Algorithm Name, Family (CID 7162), Version.
    return hd.AlgorithmIdentificationSequence(
        name=model.manifest.algorithm_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=model.version,
    )


def output_series_description(model: Model, kind: str) -> str:
    """Series Description (LO: 64 characters) of a model's SEG or SR: what wrote it, and for a
    reference model that it is not for clinical use, so that every viewer shows it."""
    description = f"AI {kind} {model.name}"
    if model.is_reference:
        description += " - not for clinical use"
    return description[:64]


def tracking_identifier(model: Model, label: Label) -> str:
    """The finding's human-readable Tracking ID (LO: 64 characters), the same in SEG and SR."""
    return f"{label.label} ({model.name})"[:64]


def lesion_tracking_identifier(model: Model, label: Label, number: int) -> str:
    """The Tracking ID of one lesion's outline in the SR, e.g. "Lesion 2 (ct_lesion_synthetic)"."""
    return f"{label.label} {number} ({model.name})"[:64]


# Recommended Display CIELab Value (0062,000D) of segment 1, 2, …, so that viewers (OHIF) draw
# each label in a stable colour of its own instead of warning and picking one (PS3.3 C.8.20.2).
SEGMENT_COLOURS = ("red", "lime", "blue", "yellow", "cyan", "magenta", "orange", "purple")


def segment_description(
    model: Model, label: Label, segment_number: int, tracking_uid: str
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=segment_number,
        segment_label=label.label,
        segmented_property_category=label.category.code(),
        segmented_property_type=label.type.code(),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(model),
        tracking_uid=tracking_uid,
        tracking_id=tracking_identifier(model, label),
        anatomic_regions=[label.finding_site.code()] if label.finding_site else None,
        display_color=hd.color.CIELabColor.from_string(
            SEGMENT_COLOURS[(segment_number - 1) % len(SEGMENT_COLOURS)]
        ),
    )


def segmentation(
    model: Model,
    source_images: Sequence[Dataset],
    masks: np.ndarray,
    labels: Sequence[Label],
    tracking_uids: Sequence[str],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    tiled: bool = False,
) -> hd.seg.Segmentation:
    """A binary SEG with one segment per label.

    ``masks`` is (frames, rows, columns, segments) bool: for slices, one frame per source image
    in ``source_images`` order; for a whole slide (``tiled``), one frame holding the total pixel
    matrix, which highdicom cuts into tiles aligned with the source's (PS3.3 C.8.12.4.1.3).
    """
    descriptions = [
        segment_description(model, label, number, uid)
        for number, (label, uid) in enumerate(zip(labels, tracking_uids, strict=True), start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name[:64],
        software_versions=model.version,
        device_serial_number=model.name[:64],
        content_label="AI_SEG",
        content_description=model.manifest.algorithm_name[:64],
        series_description=output_series_description(model, "SEG"),
        # A slide's SEG is tiled; highdicom copies the tile size (Rows, Columns) from the source.
        tile_pixel_array=tiled,
        dimension_organization_type=(
            hd.DimensionOrganizationTypeValues.TILED_SPARSE if tiled else None
        ),
    )
    if tiled and "PatientOrientation" not in seg:
        # PS3.3 C.7.6.1: Type 2C, required (possibly empty) when the image has no Image
        # Orientation (Patient), as a slide's SEG, in slide coordinates, has none.
        seg.PatientOrientation = None
    return seg
