"""The reference models on held-out synthetic cases, through ``analyse_series`` on both backend
pairs; the plug-in format's validation; and the errors unusable input gives."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

from config.settings import InferenceRule, LimitsSettings
from inference.analysis import analyse_series, predict_slices
from inference.errors import AnalysisError, ModelError
from inference.phantoms import synthetic_ct_series, synthetic_wsi
from inference.pixels import slice_stack, tiled_image
from inference.registry import REFERENCE_MODELS_DIR, Model, load_model, load_models
from inference.rules import why_no_model
from storage.archive import Archive
from storage.decoder_pool import DecoderPool
from storage.ingest import ingest_file
from tests.factories import write_part10

# The training scripts use seeds 1000 and up; these were never seen in training.
# Decodes the phantoms' pixels, as the worker's archive does (started when first used).
DECODERS = DecoderPool.from_limits(LimitsSettings())
HELD_OUT_CT_SEEDS = (0, 1, 2)
HELD_OUT_WSI_SEEDS = (0, 1)
MIN_DICE = 0.9


def _model(name: str) -> Model:
    return load_model(REFERENCE_MODELS_DIR / name)


def _ingest(archive: Archive, datasets: list[Dataset], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, ds in enumerate(datasets):
        ingest_file(archive, write_part10(ds, folder / f"{index}.dcm"))


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))


def test_ct_lesion_model_reaches_dice_on_held_out_phantoms(
    archive: Archive, tmp_path: Path
) -> None:
    model = _model("ct_lesion_synthetic")
    scores = []
    for seed in HELD_OUT_CT_SEEDS:
        datasets, truth = synthetic_ct_series(seed)
        _ingest(archive, datasets, tmp_path / str(seed))

        outputs = analyse_series(
            archive,
            model,
            datasets[0].StudyInstanceUID,
            datasets[0].SeriesInstanceUID,
            job_key=f"test-ct-{seed}",
            device="cpu",
        )

        # The SEG, the measurement report, and each lesion outlined on its key slice.
        assert [o.Modality for o in outputs] == ["SEG", "SR", "SR"]
        seg = hd.seg.Segmentation.from_dataset(outputs[0])
        predicted = seg.get_pixels_by_source_instance(
            [ds.SOPInstanceUID for ds in datasets], assert_missing_frames_are_empty=True
        )[..., 0].astype(bool)
        scores.append(dice(predicted, truth))
    print(f"CT lesion Dice on held-out phantoms {HELD_OUT_CT_SEEDS}: {np.round(scores, 3)}")
    assert min(scores) >= MIN_DICE


def test_wsi_tissue_model_reaches_dice_on_held_out_phantoms(
    archive: Archive, tmp_path: Path
) -> None:
    model = _model("wsi_tissue_synthetic")
    scores = []
    for seed in HELD_OUT_WSI_SEEDS:
        slide, truth = synthetic_wsi(seed)
        _ingest(archive, [slide], tmp_path / str(seed))

        outputs = analyse_series(
            archive,
            model,
            slide.StudyInstanceUID,
            slide.SeriesInstanceUID,
            job_key=f"test-wsi-{seed}",
            device="cpu",
        )

        assert [o.Modality for o in outputs] == ["SEG", "SR"]
        seg = hd.seg.Segmentation.from_dataset(outputs[0])
        # A tiled SEG aligned with the slide's total pixel matrix (PS3.3 C.8.12.4).
        assert (seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns) == truth.shape
        predicted = seg.get_total_pixel_matrix(combine_segments=True) > 0
        scores.append(dice(predicted, truth))
    print(f"WSI tissue Dice on held-out phantoms {HELD_OUT_WSI_SEEDS}: {np.round(scores, 3)}")
    assert min(scores) >= MIN_DICE


def test_rerun_of_a_job_gives_the_same_uids(archive: Archive, tmp_path: Path) -> None:
    model = _model("ct_lesion_synthetic")
    datasets, _truth = synthetic_ct_series(5, slices=4)
    _ingest(archive, datasets, tmp_path)
    study, series = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID

    def uids(job_key: str) -> list[tuple[str, str]]:
        outputs = analyse_series(archive, model, study, series, job_key=job_key, device="cpu")
        return [(o.SOPInstanceUID, o.SeriesInstanceUID) for o in outputs]

    first, again, other = uids("job-1"), uids("job-1"), uids("job-2")

    assert first == again
    assert not {uid for pair in first for uid in pair} & {uid for pair in other for uid in pair}
    # The results belong to the source study, in series of their own.
    assert all(uid not in (study, series) for pair in first for uid in pair)


def _sr_measurement(sr: Dataset) -> float:
    (group,) = hd.sr.Comprehensive3DSR.from_dataset(
        sr
    ).content.get_volumetric_roi_measurement_groups()
    (measurement,) = group.get_measurements()
    return float(measurement.value)


def test_sr_volume_is_the_analysed_voxels_times_the_voxel_size(
    archive: Archive, tmp_path: Path
) -> None:
    datasets, _truth = synthetic_ct_series(12, slices=6)
    _ingest(archive, datasets, tmp_path)

    seg, sr, _outlines = analyse_series(
        archive,
        _model("ct_lesion_synthetic"),
        datasets[0].StudyInstanceUID,
        datasets[0].SeriesInstanceUID,
        job_key="volume",
        device="cpu",
    )

    analysed = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in datasets], assert_missing_frames_are_empty=True
    )[..., 0]
    # The voxel size, from the phantom's own attributes: Pixel Spacing, and the distance between
    # neighbouring slices' Image Position (Patient) along the normal.
    row_mm, column_mm = (float(v) for v in datasets[0].PixelSpacing)
    positions = sorted(float(ds.ImagePositionPatient[2]) for ds in datasets)
    (gap_mm,) = {round(b - a, 6) for a, b in zip(positions, positions[1:], strict=False)}
    assert gap_mm == pytest.approx(float(datasets[0].SliceThickness))  # contiguous slices
    assert analysed.sum() > 100
    assert _sr_measurement(sr) == pytest.approx(
        int(analysed.astype(bool).sum()) * row_mm * column_mm * gap_mm, rel=1e-5
    )


def test_sr_area_is_the_analysed_pixels_times_the_pixel_area(
    archive: Archive, tmp_path: Path
) -> None:
    slide, _truth = synthetic_wsi(13, size=512)  # 4 tiles: the area's sum, not the slide size
    _ingest(archive, [slide], tmp_path)

    seg, sr = analyse_series(
        archive,
        _model("wsi_tissue_synthetic"),
        slide.StudyInstanceUID,
        slide.SeriesInstanceUID,
        job_key="area",
        device="cpu",
    )

    analysed = hd.seg.Segmentation.from_dataset(seg).get_total_pixel_matrix(segment_numbers=[1])
    measures = slide.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    row_mm, column_mm = (float(v) for v in measures.PixelSpacing)
    assert analysed.sum() > 100
    assert _sr_measurement(sr) == pytest.approx(
        int(analysed.astype(bool).sum()) * row_mm * column_mm, rel=1e-5
    )


def test_nothing_found_gives_an_sr_without_findings_and_no_seg(
    archive: Archive, tmp_path: Path
) -> None:
    datasets, _truth = synthetic_ct_series(6, slices=4)
    for ds in datasets:  # uniform soft tissue: no lesion anywhere
        ds.PixelData = np.full((ds.Rows, ds.Columns), 50, np.int16).tobytes()
    _ingest(archive, datasets, tmp_path)

    outputs = analyse_series(
        archive,
        _model("ct_lesion_synthetic"),
        datasets[0].StudyInstanceUID,
        datasets[0].SeriesInstanceUID,
        job_key="empty",
        device="cpu",
    )

    [sr] = outputs
    assert sr.Modality == "SR"
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert report.get_volumetric_roi_measurement_groups() == []
    [group] = report.get_image_measurement_groups()
    [evaluation] = group.get_qualitative_evaluations()
    assert (evaluation.name.meaning, evaluation.value.meaning) == ("Lesion", "Absent")


def test_corrupt_pixel_payload_is_an_analysis_error(archive: Archive, tmp_path: Path) -> None:
    slide, _truth = synthetic_wsi(7, size=512)
    frames = [b"\xff\xd8\xff\xe0 not a JPEG stream" for _ in range(int(slide.NumberOfFrames))]
    slide.PixelData = encapsulate(frames)
    _ingest(archive, [slide], tmp_path)

    # Decoded in batches of frames: the first batch's.
    decoded = f"{slide.SOPInstanceUID}: frames? 1(-[0-9]+)? cannot be decoded"
    with pytest.raises(AnalysisError, match=decoded):
        analyse_series(
            archive,
            _model("wsi_tissue_synthetic"),
            slide.StudyInstanceUID,
            slide.SeriesInstanceUID,
            job_key="corrupt",
            device="cpu",
        )


def test_compressed_slices_are_decoded(archive: Archive, tmp_path: Path) -> None:
    datasets, truth = synthetic_ct_series(3)
    for ds in datasets:
        ds.compress(RLELossless)
    _ingest(archive, datasets, tmp_path)

    seg, _sr, _outlines = analyse_series(
        archive,
        _model("ct_lesion_synthetic"),
        datasets[0].StudyInstanceUID,
        datasets[0].SeriesInstanceUID,
        job_key="rle",
        device="cpu",
    )

    predicted = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in datasets], assert_missing_frames_are_empty=True
    )[..., 0]
    assert dice(predicted.astype(bool), truth) >= MIN_DICE


def test_corrupt_compressed_slice_is_an_analysis_error(archive: Archive, tmp_path: Path) -> None:
    datasets, _truth = synthetic_ct_series(8, slices=3)
    for ds in datasets:
        ds.compress(RLELossless)
    # A valid RLE header (PS3.5 G.5: two segments for 16-bit samples), then garbage.
    header = struct.pack("<16L", 2, 64, 68, *[0] * 13)
    datasets[1].PixelData = encapsulate([header + b"garbage\x00"])
    _ingest(archive, datasets, tmp_path)

    with pytest.raises(AnalysisError, match=f"{datasets[1].SOPInstanceUID}: frame 1 cannot"):
        analyse_series(
            archive,
            _model("ct_lesion_synthetic"),
            datasets[0].StudyInstanceUID,
            datasets[0].SeriesInstanceUID,
            job_key="corrupt-rle",
            device="cpu",
        )


def test_slices_of_different_sizes_are_an_analysis_error(archive: Archive, tmp_path: Path) -> None:
    datasets, _truth = synthetic_ct_series(9, slices=2)
    smaller, _ = synthetic_ct_series(9, slices=1, size=64)
    smaller[0].SOPInstanceUID = generate_uid()  # same study and series (same seed)
    _ingest(archive, [*datasets, smaller[0]], tmp_path)

    with pytest.raises(AnalysisError, match="different sizes"):
        analyse_series(
            archive,
            _model("ct_lesion_synthetic"),
            datasets[0].StudyInstanceUID,
            datasets[0].SeriesInstanceUID,
            job_key="sizes",
            device="cpu",
        )


# --- the plug-in format (pure logic: no archive) ----------------------------------------------


def test_reference_models_load_and_apply_to_their_series() -> None:
    ct, wsi = load_models([REFERENCE_MODELS_DIR])

    assert (ct.name, wsi.name) == ("ct_lesion_synthetic", "wsi_tissue_synthetic")
    for model in (ct, wsi):
        # Named as trained on synthetic data wherever they are named.
        assert "synthetic" in model.manifest.algorithm_name
        assert "not for clinical use" in " ".join(model.manifest.description.split())
        assert model.weights_path.stat().st_size < 5_000_000
    abdomen_ct = {
        "Modality": "CT",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "BodyPartExamined": "ABDOMEN",
    }
    breast_slide = {
        "Modality": "SM",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.6",
        "BodyPartExamined": "BREAST",
    }
    assert ct.applies_to(abdomen_ct)
    assert not ct.applies_to({**abdomen_ct, "Modality": "MR"})
    assert wsi.applies_to(breast_slide)
    assert not wsi.applies_to(abdomen_ct)
    # The finding site each writes is the body part it applies to, never another one.
    for model, series in ((ct, abdomen_ct), (wsi, breast_slide)):
        assert not model.applies_to({**series, "BodyPartExamined": "HEAD"})
        assert not model.applies_to({**series, "BodyPartExamined": ""})
        (site,) = {label.finding_site.meaning for label in model.manifest.labels}  # type: ignore[union-attr]
        assert model.manifest.applies_to.body_parts == [site.upper()]
    # The phantoms carry the body part, so a fresh install's default rules run both models.
    assert synthetic_ct_series(0, slices=1)[0][0].BodyPartExamined == "ABDOMEN"
    assert synthetic_wsi(0, size=256)[0].BodyPartExamined == "BREAST"


def test_body_part_rule_is_case_insensitive(tmp_path: Path) -> None:
    folder = _copy_reference(tmp_path, "ct_lesion_synthetic")
    manifest = (folder / "model.toml").read_text()
    (folder / "model.toml").write_text(
        manifest.replace('body_parts = ["ABDOMEN"]', 'body_parts = ["Chest"]')
    )

    model = load_model(folder)

    ct = {"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}
    assert model.applies_to({**ct, "BodyPartExamined": "CHEST"})
    assert not model.applies_to({**ct, "BodyPartExamined": "ABDOMEN"})
    assert not model.applies_to(ct)


def _copy_reference(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for file in ("model.toml", "model.pt"):
        (folder / file).write_bytes((REFERENCE_MODELS_DIR / name / file).read_bytes())
    return folder


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda t: t.replace('kind = "slice"', 'kind = "volume"'), "kind: Input should be"),
        (lambda t: t.replace("threshold = 0.5", "threshold = 1.5"), "labels.0.threshold"),
        (lambda t: t.replace("window_width = 400.0", ""), "window_center and window_width"),
        (lambda t: t.replace('weights = "model.pt"', 'weights = "gone.pt"'), "does not exist"),
        (lambda t: t + "\nunknown_key = 1\n", "unknown_key: Extra inputs"),
        (lambda t: t.replace("[[labels]]", "[[labels]]\nlabel = "), "not valid TOML"),
        (lambda t: t.split("[[labels]]")[0], "labels: Field required"),
    ],
    ids=["kind", "threshold", "window", "weights", "unknown-key", "toml", "no-labels"],
)
def test_invalid_manifest_is_a_model_error_with_the_reason(
    tmp_path: Path, edit: object, reason: str
) -> None:
    folder = _copy_reference(tmp_path, "ct_lesion_synthetic")
    (folder / "model.toml").write_text(edit((folder / "model.toml").read_text()))  # type: ignore[operator]

    with pytest.raises(ModelError, match=reason):
        load_models([tmp_path])


def test_two_models_with_one_name_are_a_model_error(tmp_path: Path) -> None:
    for directory in ("a", "b"):
        (tmp_path / directory).mkdir()
        _copy_reference(tmp_path / directory, "ct_lesion_synthetic")

    with pytest.raises(ModelError, match="two models named 'ct_lesion_synthetic'"):
        load_models([tmp_path / "a", tmp_path / "b"])


def test_weights_that_are_not_torchscript_are_a_model_error(tmp_path: Path) -> None:
    folder = _copy_reference(tmp_path, "ct_lesion_synthetic")
    (folder / "model.pt").write_bytes(b"not a TorchScript archive")

    with pytest.raises(ModelError, match="cannot load TorchScript weights"):
        load_model(folder).network("cpu")


def test_missing_model_directory_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_models([tmp_path / "nowhere"])


def test_tile_model_picks_the_pyramid_level_nearest_its_magnification() -> None:
    full, _ = synthetic_wsi(20, size=512, pixel_spacing_mm=0.00025)  # 40x
    half, _ = synthetic_wsi(20, size=256, pixel_spacing_mm=0.0005)  # 20x
    half.SOPInstanceUID = generate_uid()

    assert tiled_image([full, half], 20.0, DECODERS).dataset is half
    assert tiled_image([full, half], 40.0, DECODERS).dataset is full
    assert (
        tiled_image([half, full], None, DECODERS).dataset is full
    )  # no magnification: the largest


def test_tiled_sparse_slide_is_an_analysis_error() -> None:
    slide, _ = synthetic_wsi(21, size=256)
    slide.DimensionOrganizationType = "TILED_SPARSE"

    with pytest.raises(AnalysisError, match="only TILED_FULL"):
        tiled_image([slide], None, DECODERS)


class _TwoChannels(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], x[:, :1]], dim=1)


def test_network_output_of_the_wrong_shape_is_a_model_error(tmp_path: Path) -> None:
    folder = _copy_reference(tmp_path, "ct_lesion_synthetic")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_TwoChannels()), str(folder / "model.pt"))
    datasets, _truth = synthetic_ct_series(22, slices=2)

    with pytest.raises(ModelError, match=r"expected logits of shape \(batch, 1, height, width\)"):
        predict_slices(load_model(folder), slice_stack(datasets, DECODERS), "cpu")


CT_IMAGE_STORAGE, WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.77.1.6"


def test_why_no_model_names_what_each_model_needs() -> None:
    ct, wsi = load_models([REFERENCE_MODELS_DIR])
    chest_ct = {"Modality": "CT", "SOPClassUID": CT_IMAGE_STORAGE, "BodyPartExamined": "CHEST"}
    why = why_no_model([InferenceRule()], [ct, wsi], chest_ct)
    assert why == (
        "ct_lesion_synthetic needs body part ABDOMEN (not CHEST); wsi_tissue_synthetic needs "
        f"modality SM (not CT), SOP class {WSI_STORAGE} (not {CT_IMAGE_STORAGE}), "
        "body part BREAST (not CHEST)"
    )
    abdomen_ct = {**chest_ct, "BodyPartExamined": "abdomen"}
    assert why_no_model([InferenceRule()], [ct, wsi], abdomen_ct) == ""  # ct runs
    only_wsi = [InferenceRule(model="wsi_tissue_synthetic")]
    assert why_no_model(only_wsi, [ct], abdomen_ct) == (
        "no [[inference.rules]] entry enables ct_lesion_synthetic for it"
    )
    assert why_no_model([], [ct], abdomen_ct) == "AI is switched off ([inference] rules = [])"
    assert why_no_model([InferenceRule()], [], abdomen_ct) == "no model is installed"
