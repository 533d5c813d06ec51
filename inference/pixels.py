"""A series' pixels, read through ``storage``: the index locates the instances, the blob store
returns their files, pydicom decodes whatever transfer syntax they were stored in, in a decoder
process under ``[limits] decode_memory_mb`` and ``decode_timeout_s`` (:mod:`storage.decoder_pool`).

Every failure to read or decode, a decode over either budget included, is an
:class:`AnalysisError` that names the instance, so that a job fails with a reason a person can
act on; a missing decoder plug-in is a :class:`DecoderUnavailable` instead (the input is fine),
and no free decoder process a :class:`storage.errors.DecodersBusy` (the job is tried again).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale, get_decoder

from inference.errors import AnalysisError, DecoderUnavailable
from storage.archive import Archive
from storage.decoder_pool import DecoderPool
from storage.dicom_file import integer_value
from storage.encapsulated_frame import check_data_set_frames
from storage.errors import DecodeFailed, InstanceTooLarge, InvalidInstance
from storage.limits import check_decode_budget, check_decoded_size, frame_bytes
from storage.pixel_decoding import PIXEL_MODULE, decoded_frames
from storage.query import entity_query, locate_instances

# PS3.3 C.8.12.4.1.1: Image Type value 3 of the WSI images a model may analyse.
_WSI_IMAGE_TYPES = {"VOLUME"}
# Tiles are decoded this many decoded bytes at a time, a decoder process per batch.
_TILES_PER_DECODE_BYTES = 32 << 20


def read_series(
    archive: Archive,
    study_instance_uid: str,
    series_instance_uid: str,
    sop_class_uids: Sequence[str] = (),
) -> list[Dataset]:
    """The series' image instances (restricted to ``sop_class_uids`` when given), each parsed
    with its pixel data still encoded."""
    query = entity_query(study_instance_uid, series_instance_uid)
    datasets: list[Dataset] = []
    for stored in locate_instances(archive, query):
        if sop_class_uids and stored.sop_class_uid not in sop_class_uids:
            continue
        with archive.blobs.open(stored.blob_key, tier=stored.tier) as stream:
            content = stream.read()
        try:
            ds = pydicom.dcmread(io.BytesIO(content))
        except (InvalidDicomError, ValueError, EOFError, OSError) as error:
            raise AnalysisError(
                f"instance {stored.sop_instance_uid}: the stored file cannot be parsed: {error}"
            ) from error
        if "PixelData" in ds:
            _check_decodable(ds, archive)
            datasets.append(ds)
    if not datasets:
        raise AnalysisError(
            f"series {series_instance_uid} of study {study_instance_uid} holds no image "
            "instance the model can analyse"
        )
    return datasets


def _check_decodable(ds: Dataset, archive: Archive) -> None:
    """Refuse, before any decode allocates it, pixel data whose declared size (PS3.3 C.7.6.3)
    is over ``[limits]`` (a slice is decoded whole, a tile frame by frame), or whose frames'
    codestreams declare another size than the data set."""
    rows, columns = integer_value(ds, "Rows") or 0, integer_value(ds, "Columns") or 0
    samples = integer_value(ds, "SamplesPerPixel") or 1
    bits = integer_value(ds, "BitsAllocated") or 8
    frames = max(1, integer_value(ds, "NumberOfFrames") or 1)
    try:
        check_decoded_size(rows, columns, samples, bits, frames, archive.limits)
        check_decode_budget(rows, columns, samples, bits, 1, archive.limits)  # one at a time
        check_data_set_frames(ds)
    except (InstanceTooLarge, InvalidInstance) as error:
        raise AnalysisError(f"instance {ds.SOPInstanceUID}: not decoded: {error}") from None


# --- slices -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceStack:
    """Single-frame slices in spatial order, with their modality values (PS3.3 C.11.1)."""

    datasets: list[Dataset]
    values: np.ndarray  # (slices, rows, columns) float32
    pixel_spacing_mm: tuple[float, float] | None  # row spacing, column spacing
    slice_spacing_mm: float | None


def slice_stack(datasets: Sequence[Dataset], decoders: DecoderPool) -> SliceStack:
    """Sort the slices along their normal (PS3.3 C.7.6.2.1.1) and decode them (in a decoder
    process, :mod:`storage.decoder_pool`)."""
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) != 1:
        raise AnalysisError(f"the slices of the series have different sizes: {sorted(shapes)}")
    frames = {int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets}
    if frames != {1}:
        raise AnalysisError("a slice model needs single-frame images; this series is multi-frame")
    ordered, slice_spacing = _spatial_order(list(datasets))
    values = np.empty((len(ordered), *shapes.pop()), np.float32)
    for index, ds in enumerate(ordered):
        values[index] = apply_rescale(_decoded(ds, decoders), ds)
    spacing = ordered[0].get("PixelSpacing")
    pixel_spacing = (float(spacing[0]), float(spacing[1])) if spacing else None
    return SliceStack(ordered, values, pixel_spacing, slice_spacing)


def _spatial_order(datasets: list[Dataset]) -> tuple[list[Dataset], float | None]:
    try:
        orientations = {
            tuple(round(float(v), 4) for v in ds.ImageOrientationPatient) for ds in datasets
        }
        positions = [np.array([float(v) for v in ds.ImagePositionPatient]) for ds in datasets]
    except (AttributeError, TypeError, ValueError):
        datasets.sort(key=lambda ds: int(ds.get("InstanceNumber") or 0))
        thickness = datasets[0].get("SliceThickness")
        return datasets, float(thickness) if thickness else None
    if len(orientations) != 1:
        raise AnalysisError("the slices of the series have different orientations")
    orientation = np.array(orientations.pop())
    normal = np.cross(orientation[:3], orientation[3:])
    distances = [float(normal @ p) for p in positions]
    order = np.argsort(distances, kind="stable")
    gaps = np.diff(np.sort(distances))
    spacing = float(np.median(gaps)) if len(gaps) else None
    if not spacing:
        thickness = datasets[0].get("SliceThickness")
        spacing = float(thickness) if thickness else None
    return [datasets[i] for i in order], spacing


def check_decoder(ds: Dataset) -> None:
    """:class:`DecoderUnavailable` when no installed plug-in decodes the instance's transfer
    syntax; :class:`AnalysisError` when pydicom knows no decoder for it at all."""
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as error:
        raise AnalysisError(
            f"instance {ds.SOPInstanceUID}: no pixel data decoder exists for transfer syntax "
            f"{syntax}"
        ) from error
    if not decoder.is_available:
        raise DecoderUnavailable(
            f"instance {ds.SOPInstanceUID}: this worker has no decoder plug-in for transfer "
            f"syntax {syntax} ({syntax.name}); install one of: "
            f"{'; '.join(decoder.missing_dependencies)}, then re-run the job"
        )


def _decoded(ds: Dataset, decoders: DecoderPool) -> np.ndarray:
    check_decoder(ds)
    (frame,) = _decoded_frames(ds, decoders, _stored_frames(ds)[:1], 0)
    return frame


def _decoded_frames(
    ds: Dataset, decoders: DecoderPool, frames: list[bytes], first: int
) -> np.ndarray:
    """``frames`` (stored bytes; ``first`` the zero-based index of the first) decoded in a
    decoder process, colour as RGB; a decode that fails or passes a ``[limits]`` budget fails
    the job with the reason."""
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        return decoders.run(decoded_frames, _pixel_module(ds), str(syntax), frames)
    except DecodeFailed as error:
        last = first + len(frames)
        which = f"frame {last}" if len(frames) == 1 else f"frames {first + 1}-{last}"
        raise AnalysisError(
            f"instance {ds.SOPInstanceUID}: {which} cannot be decoded "
            f"(transfer syntax {syntax}): {error}"
        ) from None


def _stored_frames(ds: Dataset) -> list[bytes]:
    """The stored bytes of each frame: the fragments of each encapsulated frame, or the native
    Pixel Data cut into frames."""
    count = max(1, integer_value(ds, "NumberOfFrames") or 1)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return list(generate_frames(ds.PixelData, number_of_frames=count))
    size = len(ds.PixelData) // count
    return [ds.PixelData[i * size : (i + 1) * size] for i in range(count)]


def _pixel_module(ds: Dataset) -> dict[str, Any]:
    module = Dataset()
    for tag in PIXEL_MODULE:
        if int(tag, 16) in ds:
            module[int(tag, 16)] = ds[int(tag, 16)]
    return module.to_json_dict()


# --- whole slide images -----------------------------------------------------------------------


@dataclass(frozen=True)
class TiledImage:
    """One pyramid level of a WSI (PS3.3 C.8.12.4, TILED_FULL), decoded frame by frame."""

    dataset: Dataset
    rows: int  # Total Pixel Matrix Rows
    columns: int
    tile_rows: int
    tile_columns: int
    pixel_spacing_mm: tuple[float, float] | None
    decoders: DecoderPool

    @property
    def tiles_across(self) -> int:
        return -(-self.columns // self.tile_columns)

    def tiles(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(top, left, RGB tile) in frame order; PS3.3 C.8.12.4.1.3: TILED_FULL frames run
        along the rows of the total pixel matrix, left to right, top to bottom."""
        ds = self.dataset
        check_decoder(ds)
        stored = _stored_frames(ds)
        one = frame_bytes(
            self.tile_rows,
            self.tile_columns,
            integer_value(ds, "SamplesPerPixel") or 1,
            integer_value(ds, "BitsAllocated") or 8,
        )
        per_call = max(1, _TILES_PER_DECODE_BYTES // max(1, one))
        for first in range(0, len(stored), per_call):
            decoded = _decoded_frames(ds, self.decoders, stored[first : first + per_call], first)
            for index, frame in enumerate(decoded, start=first):
                top = (index // self.tiles_across) * self.tile_rows
                left = (index % self.tiles_across) * self.tile_columns
                yield top, left, frame


def tiled_image(
    datasets: Sequence[Dataset], magnification: float | None, decoders: DecoderPool
) -> TiledImage:
    """The VOLUME level nearest ``magnification`` (PS3.3 C.8.12.4.1.1), or the largest."""
    levels = [
        ds
        for ds in datasets
        if len(ds.get("ImageType", [])) > 2 and ds.ImageType[2] in _WSI_IMAGE_TYPES
    ]
    if not levels:
        raise AnalysisError("the series holds no VOLUME image of a whole slide")
    levels.sort(key=lambda ds: -int(ds.TotalPixelMatrixColumns))
    chosen = levels[0]
    if magnification is not None:
        # 10 µm per pixel at 1x, by the usual microscope convention (40x = 0.25 µm).
        wanted = 0.01 / magnification
        chosen = min(levels, key=lambda ds: abs(np.log((_spacing(ds) or (wanted,))[0] / wanted)))
    organization = chosen.get("DimensionOrganizationType", "")
    if organization != "TILED_FULL":
        raise AnalysisError(
            f"instance {chosen.SOPInstanceUID}: Dimension Organization Type is "
            f"{organization or 'absent'}; only TILED_FULL whole slide images are supported"
        )
    if (
        int(chosen.get("TotalPixelMatrixFocalPlanes", 1)) != 1
        or int(chosen.get("NumberOfOpticalPaths", 1)) != 1
    ):
        raise AnalysisError("only single focal plane, single optical path images are supported")
    return TiledImage(
        chosen,
        int(chosen.TotalPixelMatrixRows),
        int(chosen.TotalPixelMatrixColumns),
        int(chosen.Rows),
        int(chosen.Columns),
        _spacing(chosen),
        decoders,
    )


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    try:
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return float(spacing[0]), float(spacing[1])
    except (AttributeError, IndexError, KeyError):
        return None
