"""One model on one series: pixels in through ``storage``, a DICOM SEG and a TID 1500 SR out.

Empty-result policy: a label with no pixel above its threshold gets no segment; when no label
found anything there is no SEG. The SR (when the manifest asks for one) is always written: a
found label is a finding with its area or volume and its segment, a label found nowhere is a
measurement group whose qualitative evaluation says "<finding type>: Absent", so a reader sees
that the model ran and found nothing. A slice model's SR comes with a second one when it found
something: each lesion outlined on its largest slice (inference.lesions, TID 1410), for viewers
that draw only planar measurements (OHIF).

Every UID derives from ``job_key`` and the series. The worker passes the job's key and generation
(``Job.output_key``): another attempt of the same generation (after a killed worker) gives the same
UIDs and replaces its output instead of adding to it; a run on new input or a re-run (the next
generation) gives new UIDs, so a stale run can never overwrite a fresh one's results.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from inference.errors import ModelError
from inference.lesions import planar_rois
from inference.pixels import SliceStack, TiledImage, read_series, slice_stack, tiled_image
from inference.registry import Model
from inference.seg import segmentation
from inference.sr import Finding, LesionOutline, measurement_report, outlines_report
from storage.archive import Archive

log = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def derived_uid(job_key: str, series_instance_uid: str, purpose: str) -> str:
    """A UID that is the same for every run with this ``job_key`` (PS3.5 B.2: a UID derived by a
    hash)."""
    return generate_uid(entropy_srcs=["hilum-inference", job_key, series_instance_uid, purpose])


def analyse_series(
    archive: Archive,
    model: Model,
    study_instance_uid: str,
    series_instance_uid: str,
    *,
    job_key: str,
    device: str | None = None,
) -> list[Dataset]:
    """The output datasets of ``model`` on the series: a SEG (when asked for and something was
    found) and a Comprehensive 3D SR (when asked for), every UID derived from ``job_key``.

    Raises :class:`AnalysisError` for unusable input; any error of the network propagates.
    """
    device = device or default_device()
    manifest = model.manifest
    datasets = read_series(
        archive, study_instance_uid, series_instance_uid, manifest.applies_to.sop_class_uids
    )
    if manifest.kind == "slice":
        stack = slice_stack(datasets, archive.decoders)
        masks = predict_slices(model, stack, device)
        sources: list[Dataset] = stack.datasets
        sizes = _volumes(stack, masks)
        rois = planar_rois(masks, stack.pixel_spacing_mm)
    else:
        image = tiled_image(datasets, manifest.preprocessing.magnification, archive.decoders)
        masks = predict_tiles(model, image, device)[None]
        sources = [image.dataset]
        sizes = _areas(image, masks)
        rois = []  # the slide's SEG segment and its area are the finding (TID 1411)

    found = [i for i in range(len(manifest.labels)) if masks[..., i].any()]
    log.info(
        "%s %s on series %s: %d of %d labels found",
        model.name, model.version, series_instance_uid, len(found), len(manifest.labels),
    )  # fmt: skip
    tracking_uids = [
        derived_uid(job_key, series_instance_uid, f"tracking/{label.label}")
        for label in manifest.labels
    ]
    outputs: list[Dataset] = []
    seg = None
    if manifest.outputs.seg and found:
        seg = segmentation(
            model,
            sources,
            masks[..., found],
            [manifest.labels[i] for i in found],
            [tracking_uids[i] for i in found],
            series_instance_uid=derived_uid(job_key, series_instance_uid, "seg-series"),
            sop_instance_uid=derived_uid(job_key, series_instance_uid, "seg"),
            tiled=manifest.kind == "tile",
        )
        outputs.append(seg)
    if manifest.outputs.sr:
        segment_numbers = {i: number for number, i in enumerate(found, start=1)}
        findings = [
            Finding(
                label=label,
                tracking_uid=tracking_uids[i],
                size=sizes[i] if i in segment_numbers else None,
                planar=manifest.kind == "tile",
                segment_number=segment_numbers.get(i) if seg is not None else None,
                present=i in segment_numbers,
            )
            for i, label in enumerate(manifest.labels)
        ]
        lesions = [
            LesionOutline(
                label=manifest.labels[roi.label_index],
                lesion_number=roi.lesion_number,
                tracking_uid=derived_uid(
                    job_key,
                    series_instance_uid,
                    f"tracking/{manifest.labels[roi.label_index].label}/{roi.lesion_number}",
                ),
                key_image=sources[roi.slice_index],
                outline=roi.outline,
                area_mm2=roi.area_mm2,
                long_axis_mm=roi.long_axis_mm,
            )
            for roi in rois
        ]
        outputs.append(
            measurement_report(
                model,
                sources,
                findings,
                seg,
                series_instance_uid=derived_uid(job_key, series_instance_uid, "sr-series"),
                sop_instance_uid=derived_uid(job_key, series_instance_uid, "sr"),
            )
        )
        if lesions:
            outputs.append(
                outlines_report(
                    model,
                    lesions,
                    series_instance_uid=derived_uid(
                        job_key, series_instance_uid, "outlines-series"
                    ),
                    sop_instance_uid=derived_uid(job_key, series_instance_uid, "outlines"),
                )
            )
    return outputs


def _thresholds(model: Model, device: str) -> torch.Tensor:
    values = [label.threshold for label in model.manifest.labels]
    return torch.tensor(values, device=device).view(1, -1, 1, 1)


def _run(model: Model, network: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = network(batch)
    labels = len(model.manifest.labels)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4 or logits.shape[1] != labels:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise ModelError(
            f"model {model.name}: the network returned {shape}; expected logits of shape "
            f"(batch, {labels}, height, width), one channel per label of model.toml"
        )
    return torch.sigmoid(logits)


def predict_slices(model: Model, stack: SliceStack, device: str) -> np.ndarray:
    """(slices, rows, columns, labels) bool, slice by slice in batches."""
    p = model.manifest.preprocessing
    network = model.network(device)
    values = stack.values
    if p.window_center is not None and p.window_width is not None:
        # PS3.3 C.11.2.1.2-like linear window onto [0, 1].
        low = p.window_center - p.window_width / 2
        values = np.clip((values - low) / p.window_width, 0.0, 1.0)
    n, rows, columns = values.shape
    masks = np.empty((n, rows, columns, len(model.manifest.labels)), bool)
    thresholds = _thresholds(model, device)
    with torch.inference_mode():
        for start in range(0, n, p.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(values[start : start + p.batch_size]))
            batch = batch[:, None].to(device)
            if p.input_size and (rows, columns) != (p.input_size, p.input_size):
                batch = F.interpolate(batch, size=(p.input_size,) * 2, mode="bilinear")
            probabilities = _run(model, network, batch)
            if probabilities.shape[-2:] != (rows, columns):
                probabilities = F.interpolate(probabilities, size=(rows, columns), mode="bilinear")
            found = (probabilities > thresholds).permute(0, 2, 3, 1)
            masks[start : start + len(batch)] = found.cpu().numpy()
    _drop_small(model, masks)
    return masks


def predict_tiles(model: Model, image: TiledImage, device: str) -> np.ndarray:
    """(total rows, total columns, labels) bool, tile by tile in batches."""
    p = model.manifest.preprocessing
    tile_size = p.tile_size
    assert tile_size is not None  # the manifest validates this for tile models
    network = model.network(device)
    masks = np.zeros((image.rows, image.columns, len(model.manifest.labels)), bool)
    thresholds = _thresholds(model, device)
    pending: list[tuple[int, int, np.ndarray]] = []

    def flush() -> None:
        batch = torch.from_numpy(np.stack([tile for _, _, tile in pending]))
        batch = batch.to(device).permute(0, 3, 1, 2).float() / 255.0
        size = batch.shape[-2:]
        if tuple(size) != (tile_size, tile_size):
            batch = F.interpolate(batch, size=(tile_size, tile_size), mode="bilinear")
        probabilities = _run(model, network, batch)
        if probabilities.shape[-2:] != size:
            probabilities = F.interpolate(probabilities, size=tuple(size), mode="bilinear")
        found = (probabilities > thresholds).permute(0, 2, 3, 1).cpu().numpy()
        for (top, left, _), tile_mask in zip(pending, found, strict=True):
            # Tiles on the right and bottom edges extend past the total pixel matrix.
            height, width = min(image.rows - top, size[0]), min(image.columns - left, size[1])
            masks[top : top + height, left : left + width] = tile_mask[:height, :width]
        pending.clear()

    with torch.inference_mode():
        for tile in image.tiles():
            pending.append(tile)
            if len(pending) == p.batch_size:
                flush()
        if pending:
            flush()
    _drop_small(model, masks[None])
    return masks


def _drop_small(model: Model, masks: np.ndarray) -> None:
    """Clear a label in a slice (or a whole slide) with fewer than its ``min_pixels``."""
    for index, label in enumerate(model.manifest.labels):
        if label.min_pixels:
            counts = masks[..., index].sum(axis=(1, 2))
            masks[counts < label.min_pixels, :, :, index] = False


def _volumes(stack: SliceStack, masks: np.ndarray) -> list[float | None]:
    if stack.pixel_spacing_mm is None or stack.slice_spacing_mm is None:
        return [None] * masks.shape[-1]
    voxel = stack.pixel_spacing_mm[0] * stack.pixel_spacing_mm[1] * stack.slice_spacing_mm
    return [float(masks[..., i].sum()) * voxel for i in range(masks.shape[-1])]


def _areas(image: TiledImage, masks: np.ndarray) -> list[float | None]:
    if image.pixel_spacing_mm is None:
        return [None] * masks.shape[-1]
    pixel = image.pixel_spacing_mm[0] * image.pixel_spacing_mm[1]
    return [float(masks[..., i].sum()) * pixel for i in range(masks.shape[-1])]
