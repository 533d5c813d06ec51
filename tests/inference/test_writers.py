"""The SEG and SR writers: highdicom reads what they write back, and ``dciodvfy`` (dicom3tools,
``make system-deps``) finds no error in it. Masks are the phantoms' ground truth, so these tests
need neither a network nor an archive."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from config.settings import LimitsSettings
from inference.analysis import derived_uid
from inference.lesions import planar_rois
from inference.measurement_report import read_findings, with_outlines
from inference.phantoms import synthetic_ct_series, synthetic_wsi
from inference.pixels import slice_stack, tiled_image
from inference.registry import REFERENCE_MODELS_DIR, Model, load_model
from inference.seg import segmentation
from inference.sr import Finding, LesionOutline, measurement_report, outlines_report
from storage.decoder_pool import DecoderPool

DCIODVFY = Path("/usr/bin/dciodvfy")
# Decodes the phantoms' pixels, as the worker's archive does (started when first used).
DECODERS = DecoderPool.from_limits(LimitsSettings())
CT_MODEL = load_model(REFERENCE_MODELS_DIR / "ct_lesion_synthetic")
WSI_MODEL = load_model(REFERENCE_MODELS_DIR / "wsi_tissue_synthetic")


def _uids(purpose: str) -> dict[str, str]:
    return {
        "series_instance_uid": derived_uid("writers", purpose, "series"),
        "sop_instance_uid": derived_uid("writers", purpose, "instance"),
    }


def _finding(model: Model, size: float | None, planar: bool, **kw: object) -> Finding:
    label = model.manifest.labels[0]
    return Finding(label, derived_uid("writers", model.name, "tracking"), size, planar, **kw)  # type: ignore[arg-type]


def ct_outputs() -> tuple[list[Dataset], np.ndarray, hd.seg.Segmentation, hd.sr.Comprehensive3DSR]:
    datasets, truth = synthetic_ct_series(11, slices=8)
    stack = slice_stack(datasets, DECODERS)  # sorted along the normal: the phantom's order already
    finding = _finding(CT_MODEL, float(truth.sum()) * 1.5 * 1.5 * 5.0, False, segment_number=1)
    seg = segmentation(
        CT_MODEL,
        stack.datasets,
        truth[..., None],
        [finding.label],
        [finding.tracking_uid],
        **_uids("ct-seg"),
    )
    sr = measurement_report(CT_MODEL, stack.datasets, [finding], seg, **_uids("ct-sr"))
    return stack.datasets, truth, seg, sr


def ct_outlines() -> tuple[list[Dataset], np.ndarray, hd.sr.Comprehensive3DSR]:
    datasets, truth = synthetic_ct_series(11, slices=8)
    stack = slice_stack(datasets, DECODERS)
    lesions = _lesions(stack.datasets, truth, stack.pixel_spacing_mm)
    return stack.datasets, truth, outlines_report(CT_MODEL, lesions, **_uids("ct-outlines"))


def _lesions(
    datasets: list[Dataset], truth: np.ndarray, spacing: tuple[float, float] | None
) -> list[LesionOutline]:
    label = CT_MODEL.manifest.labels[0]
    return [
        LesionOutline(
            label,
            roi.lesion_number,
            derived_uid("writers", "lesion", str(roi.lesion_number)),
            datasets[roi.slice_index],
            roi.outline,
            roi.area_mm2,
            roi.long_axis_mm,
        )
        for roi in planar_rois(truth[..., None], spacing)
    ]


def wsi_outputs() -> tuple[Dataset, np.ndarray, hd.seg.Segmentation, hd.sr.Comprehensive3DSR]:
    slide, truth = synthetic_wsi(12)
    source = tiled_image([slide], WSI_MODEL.manifest.preprocessing.magnification, DECODERS).dataset
    area = float(truth.sum()) * 0.0005**2
    finding = _finding(WSI_MODEL, area, True, segment_number=1)
    seg = segmentation(
        WSI_MODEL,
        [source],
        truth[None, ..., None],
        [finding.label],
        [finding.tracking_uid],
        tiled=True,
        **_uids("wsi-seg"),
    )
    sr = measurement_report(WSI_MODEL, [source], [finding], seg, **_uids("wsi-sr"))
    return source, truth, seg, sr


def _saved(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_seg_of_slices_reads_back(tmp_path: Path) -> None:
    sources, truth, seg, _sr = ct_outputs()

    back = hd.seg.segread(_saved(seg, tmp_path / "seg.dcm"))

    assert back.SegmentationType == "BINARY"
    assert back.StudyInstanceUID == sources[0].StudyInstanceUID
    assert back.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    pixels = back.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in sources], assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), truth)
    [description] = back.SegmentSequence
    assert description.SegmentLabel == "Lesion"
    assert description.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert description.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert description.SegmentAlgorithmType == "AUTOMATIC"
    assert "synthetic" in description.SegmentAlgorithmName
    assert description.AnatomicRegionSequence[0].CodeMeaning == "Abdomen"
    assert back.SeriesDescription == "AI SEG ct_lesion_synthetic - not for clinical use"
    # Viewers draw segment 1 in its recommended colour (red), with no "colour not found".
    assert hd.color.CIELabColor.from_dicom_value(
        description.RecommendedDisplayCIELabValue
    ).to_rgb() == (255, 0, 0)


def test_tiled_seg_is_aligned_with_the_total_pixel_matrix(tmp_path: Path) -> None:
    source, truth, seg, _sr = wsi_outputs()

    back = hd.seg.segread(_saved(seg, tmp_path / "seg.dcm"))

    assert (back.TotalPixelMatrixRows, back.TotalPixelMatrixColumns) == truth.shape
    assert (back.Rows, back.Columns) == (source.Rows, source.Columns)
    assert back.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert back.ContainerIdentifier == source.ContainerIdentifier
    np.testing.assert_array_equal(back.get_total_pixel_matrix(combine_segments=True) > 0, truth)
    assert back.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Neoplasm"


@pytest.mark.parametrize(
    ("outputs", "concept", "unit"),
    [(ct_outputs, codes.SCT.Volume, "mm3"), (wsi_outputs, codes.SCT.Area, "mm2")],
    ids=["ct", "wsi"],
)
def test_sr_measurement_report_reads_back(
    tmp_path: Path, outputs: object, concept: object, unit: str
) -> None:
    _sources, truth, seg, sr = outputs()  # type: ignore[operator]

    back = hd.sr.srread(_saved(sr, tmp_path / "sr.dcm"))

    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    [group] = back.content.get_volumetric_roi_measurement_groups()
    assert group.tracking_uid == derived_uid("writers", seg.ManufacturerModelName, "tracking")
    assert "(" in group.tracking_identifier
    assert group.finding_type is not None and group.finding_type.scheme_designator == "SCT"
    assert group.finding_sites[0].value.scheme_designator == "SCT"
    reference = group.referenced_segment
    assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
    [measurement] = group.get_measurements()
    assert measurement.name == concept
    assert measurement.unit.value == unit
    assert measurement.value == pytest.approx(float(truth.sum()) * _unit_size(seg), rel=1e-3)
    # TID 4019 Algorithm Identification: Algorithm Name (DCM 111001) and Version (DCM 111003).
    assert set(_text_values(back, "111001")) == {seg.SegmentSequence[0].SegmentAlgorithmName}
    assert "synthetic" in seg.SegmentSequence[0].SegmentAlgorithmName
    assert set(_text_values(back, "111003")) == {"1.0.0"}


def test_ct_sr_outlines_each_lesion_on_its_key_slice(tmp_path: Path) -> None:
    """TID 1410 per lesion: a closed polyline on the slice where the lesion is largest, whose
    area is the lesion's pixels there, and its long axis; what OHIF lists and draws."""
    datasets, truth, sr = ct_outlines()
    rois = planar_rois(truth[..., None], (1.5, 1.5))
    assert rois, "the phantom has at least one lesion"

    back = hd.sr.srread(_saved(sr, tmp_path / "sr.dcm"))

    groups = back.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(rois)
    for group, roi in zip(groups, rois, strict=True):
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = region.value
        assert (points[0] == points[-1]).all()  # closed
        key_slice = truth[roi.slice_index]
        [source] = region.ContentSequence  # SELECTED FROM the key slice
        source_image = hd.sr.SourceImageForRegion.from_dataset(source)
        assert source_image.referenced_sop_instance_uid == datasets[roi.slice_index].SOPInstanceUID
        # The slice is the lesion's largest, and the outline stays within the image.
        assert key_slice.sum() > 0
        assert points.min() >= 0 and points[:, 0].max() <= key_slice.shape[1]
        area, long_axis = group.get_measurements()
        assert area.name == codes.SCT.Area and area.unit.value == "mm2"
        assert long_axis.name == codes.SCT.LongAxis and long_axis.unit.value == "mm"
        assert area.value == pytest.approx(roi.area_mm2, rel=1e-5)
        assert long_axis.value > 1.5  # longer than one pixel
    assert back.SeriesDescription == "AI outlines ct_lesion_synthetic - not for clinical use"
    # Hilum's own reader sees them too, as the outlines of the report's finding.
    [finding] = with_outlines(read_findings(ct_outputs()[3]), read_findings(sr))
    outlined = finding.outlines
    assert [f.key_image_sop_instance_uid for f in outlined] == [
        datasets[roi.slice_index].SOPInstanceUID for roi in rois
    ]
    assert all(f.size_name == "Area" and f.size_unit == "mm2" for f in outlined)


def _text_values(ds: Dataset, code_value: str) -> list[str]:
    """The TEXT values of the content items named ``code_value``, anywhere in the tree."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeValue == code_value and "TextValue" in item:
            found.append(item.TextValue)
        found += _text_values(item, code_value)
    return found


def _unit_size(seg: Dataset) -> float:
    if "TotalPixelMatrixRows" in seg:
        return 0.0005**2
    return 1.5 * 1.5 * 5.0


def test_seg_and_sr_carry_the_same_tracking_id_within_64_characters() -> None:
    datasets, truth = synthetic_ct_series(15, slices=2)
    manifest = CT_MODEL.manifest.model_copy(
        update={
            "name": "m" * 64,
            "labels": [CT_MODEL.manifest.labels[0].model_copy(update={"label": "L" * 64})],
        }
    )
    model = Model(manifest.name, CT_MODEL.version, CT_MODEL.path, manifest)
    finding = _finding(model, 1.0, False, segment_number=1)

    seg = segmentation(
        model, datasets, truth[..., None], [finding.label], [finding.tracking_uid], **_uids("id")
    )
    sr = measurement_report(model, datasets, [finding], seg, **_uids("id-sr"))

    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    [group] = report.get_volumetric_roi_measurement_groups()
    assert seg.SegmentSequence[0].TrackingID == group.tracking_identifier
    assert len(group.tracking_identifier) == 64


def test_sr_without_seg_and_with_nothing_found_reads_back(tmp_path: Path) -> None:
    datasets, _truth = synthetic_ct_series(13, slices=2)
    absent = _finding(CT_MODEL, None, False, present=False)

    sr = measurement_report(CT_MODEL, datasets, [absent], None, **_uids("absent"))

    back = hd.sr.srread(_saved(sr, tmp_path / "sr.dcm"))
    [group] = back.content.get_image_measurement_groups()
    [evaluation] = group.get_qualitative_evaluations()
    assert evaluation.value == codes.SCT.Absent


def _dciodvfy_errors(path: Path) -> list[str]:
    if not DCIODVFY.exists():
        pytest.fail(f"{DCIODVFY} is missing: run `make system-deps` (Debian package dicom3tools)")
    result = subprocess.run(
        [str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    report = result.stdout + result.stderr
    return [line for line in report.splitlines() if line.startswith("Error")]


@pytest.mark.parametrize(
    "which", ["ct-seg", "ct-sr", "ct-outlines", "wsi-seg", "wsi-sr", "sr-absent"]
)
def test_outputs_pass_dciodvfy(tmp_path: Path, which: str) -> None:
    if which == "ct-outlines":
        seg, sr = None, ct_outlines()[2]
    elif which.startswith("ct"):
        _s, _t, seg, sr = ct_outputs()
    elif which.startswith("wsi"):
        _s, _t, seg, sr = wsi_outputs()
    else:
        datasets, _t = synthetic_ct_series(13, slices=2)
        absent = _finding(CT_MODEL, None, False, present=False)
        seg, sr = None, measurement_report(CT_MODEL, datasets, [absent], None, **_uids("a"))
    output = seg if which.endswith("seg") else sr

    assert _dciodvfy_errors(_saved(output, tmp_path / f"{which}.dcm")) == []


@pytest.mark.parametrize("which", ["ct", "wsi"])
def test_phantoms_pass_dciodvfy(tmp_path: Path, which: str) -> None:
    source = synthetic_ct_series(14, slices=1)[0][0] if which == "ct" else synthetic_wsi(14)[0]

    assert _dciodvfy_errors(_saved(source, tmp_path / f"{which}.dcm")) == []
