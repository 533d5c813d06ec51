"""The work done in a decoder process (:mod:`storage.decoder_pool`): decoding frames, rendering
one (PS3.18 8.3.5), transcoding an instance (PS3.5 8.2).

Each function takes plain values (bytes, the DICOM JSON of the attributes it needs, numbers)
and returns plain values, so that it can be sent to a decoder process and its result sent back;
none touches the index or the blob store. The caller has checked the declared sizes
(:mod:`storage.limits`) and, where it holds the frames, their codestream headers
(:mod:`storage.encapsulated_frame`) before sending the work.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID
from pynetdicom.dsutils import encode

from storage.encapsulated_frame import check_data_set_frames

# Image Pixel Module attributes (PS3.3 C.7.6.3) that decoding a frame needs.
PIXEL_MODULE = (
    "00280002",  # SamplesPerPixel
    "00280004",  # PhotometricInterpretation
    "00280006",  # PlanarConfiguration
    "00280010",  # Rows
    "00280011",  # Columns
    "00280100",  # BitsAllocated
    "00280101",  # BitsStored
    "00280102",  # HighBit
    "00280103",  # PixelRepresentation
)
# ... and rendering it: the Modality LUT (PS3.3 C.11.1) and the VOI LUT window (C.11.2).
RENDERING_ATTRIBUTES = (
    *PIXEL_MODULE,
    "00281050",  # WindowCenter
    "00281051",  # WindowWidth
    "00281052",  # RescaleIntercept
    "00281053",  # RescaleSlope
)


# A native frame of at most this many samples is rendered in the requesting process, not sent
# to a decoder process: no codec runs on it, its cost is linear in bytes that ingest found
# present, and a rendering holds about 10 bytes a sample (40 MiB here), while the round trip to
# a decoder process would cost more than the work itself.
IN_PROCESS_MAX_SAMPLES = 1 << 22


def is_small_native(metadata: dict[str, Any], transfer_syntax: str) -> bool:
    """Native (uncompressed) pixel data, with at most :data:`IN_PROCESS_MAX_SAMPLES` samples a
    frame as declared (PS3.3 C.7.6.3)."""
    if UID(transfer_syntax).is_encapsulated:
        return False
    samples = 1
    for tag, default in (("00280010", 0), ("00280011", 0), ("00280002", 1)):
        values = metadata.get(tag, {}).get("Value") or [default]
        try:
            samples *= max(0, int(values[0]))
        except (TypeError, ValueError):
            return False
    return samples <= IN_PROCESS_MAX_SAMPLES


def attributes(metadata: dict[str, Any], tags: Sequence[str]) -> dict[str, Any]:
    """The DICOM JSON of ``tags`` only: what is sent to a decoder, not the whole metadata (a
    whole-slide image's runs to megabytes)."""
    return {tag: metadata[tag] for tag in tags if tag in metadata}


def frame_dataset(metadata: dict[str, Any], transfer_syntax: str, frame: bytes) -> Dataset:
    """A one-frame data set around ``frame`` with the instance's Image Pixel attributes, so
    pydicom's decoders (pylibjpeg, openjpeg, RLE) can decode it."""
    ds = Dataset.from_json(attributes(metadata, PIXEL_MODULE))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.NumberOfFrames = 1
    encapsulated = UID(transfer_syntax).is_encapsulated
    ds.PixelData = encapsulate([frame]) if encapsulated else frame
    ds["PixelData"].VR = "OB" if encapsulated else "OW"
    return ds


def decoded_frame(metadata: dict[str, Any], transfer_syntax: str, frame: bytes) -> np.ndarray:
    """The frame's pixels (colour as RGB, interleaved)."""
    return frame_dataset(metadata, transfer_syntax, frame).pixel_array


def decoded_frames(
    metadata: dict[str, Any], transfer_syntax: str, frames: Sequence[bytes]
) -> np.ndarray:
    """The frames' pixels, stacked: (frames, rows, columns[, samples])."""
    return np.stack([decoded_frame(metadata, transfer_syntax, frame) for frame in frames])


def native_frame(metadata: dict[str, Any], transfer_syntax: str, frame: bytes) -> bytes:
    """The frame decoded to native little-endian pixels (PS3.18 8.7.3.3.2 octet-stream).

    Colour frames are sent as decoded (RGB, interleaved).
    """
    pixels = decoded_frame(metadata, transfer_syntax, frame)
    return pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()


# -- rendering --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderingParameters:
    """PS3.18 8.3.5.1: window, viewport and quality."""

    window: tuple[float, float, str] | None = None  # center, width, function
    viewport: tuple[int, int] | None = None  # width, height
    quality: int = 90


def _first_number(metadata: dict[str, Any], tag: str) -> float | None:
    values = metadata.get(tag, {}).get("Value")
    try:
        return float(values[0]) if values else None
    except (TypeError, ValueError):
        return None


def to_8_bit(
    pixels: np.ndarray, metadata: dict[str, Any], params: RenderingParameters
) -> np.ndarray:
    """Modality LUT (rescale) then VOI LUT window (PS3.3 C.11.2.1.2), to 0-255."""
    samples = int(_first_number(metadata, "00280002") or 1)
    if samples > 1 and params.window is None:
        if pixels.dtype == np.uint8:
            return pixels
        peak = max(float(pixels.max()), 1.0)
        return (pixels.astype(np.float64) * 255.0 / peak).astype(np.uint8)
    values = pixels.astype(np.float64)
    slope = _first_number(metadata, "00281053") or 1.0
    intercept = _first_number(metadata, "00281052") or 0.0
    values = values * slope + intercept
    if params.window is not None:
        center, width, function = params.window
    else:
        stored_center = _first_number(metadata, "00281050")
        stored_width = _first_number(metadata, "00281051")
        function = "linear"
        if stored_center is None or not stored_width or stored_width <= 0:
            low, high = float(values.min()), float(values.max())
            center, width = (low + high) / 2, max(high - low, 1.0)
        else:
            center, width = stored_center, stored_width
    if function == "sigmoid":
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "linear-exact":
        out = (values - (center - width / 2)) / width * 255.0
    else:
        out = ((values - (center - 0.5)) / (width - 1 if width > 1 else 1) + 0.5) * 255.0
    out = np.clip(out, 0, 255).astype(np.uint8)
    photometric = (metadata.get("00280004", {}).get("Value") or [""])[0]
    return 255 - out if photometric == "MONOCHROME1" else out


def render(
    pixels: np.ndarray, metadata: dict[str, Any], params: RenderingParameters, media_type: str
) -> bytes:
    """``pixels`` windowed, scaled to the viewport and encoded as ``media_type``."""
    image = Image.fromarray(to_8_bit(pixels, metadata, params))
    if params.viewport is not None:
        image.thumbnail(params.viewport)  # keeps the aspect ratio, never enlarges
    out = io.BytesIO()
    if media_type == "image/png":
        image.save(out, format="PNG")
    else:
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(
            out, format="JPEG", quality=params.quality
        )
    return out.getvalue()


def rendered_frame(
    metadata: dict[str, Any],
    transfer_syntax: str,
    frame: bytes,
    params: RenderingParameters,
    media_type: str,
) -> bytes:
    """The frame decoded and rendered (:func:`render`)."""
    return render(decoded_frame(metadata, transfer_syntax, frame), metadata, params, media_type)


# -- transcoding ------------------------------------------------------------------------------


class TranscodingRefused(Exception):
    """This instance cannot be given in that transfer syntax (:mod:`server.transcoding`); the
    message says why."""


def transcode(dataset: Dataset, syntax: str) -> Dataset:
    """``dataset`` (read from its stored file) re-encoded in ``syntax``, in place.

    The SOP Instance UID is kept: only the encoding changes, not the image (PS3.5 8.2; PS3.18
    8.7.3.5). pydicom would generate a new UID by default. A deflated data set is already
    inflated by pydicom when read; a big endian one is refused (its pixel data would need byte
    swapping).
    """
    stored = UID(dataset.file_meta.TransferSyntaxUID)
    target = UID(syntax)
    if target == stored:
        return dataset  # re-encoded as it is (a file without a preamble, to a DIMSE peer)
    if not stored.is_little_endian:
        raise TranscodingRefused(f"cannot convert {stored.name} to {target.name}")
    has_pixels = "PixelData" in dataset
    try:
        check_data_set_frames(dataset)  # before a decoder allocates what a frame declares
        if stored.is_encapsulated and has_pixels:
            dataset.decompress(generate_instance_uid=False)
        if target.is_encapsulated and has_pixels:
            dataset.compress(target, generate_instance_uid=False)
        else:
            dataset.file_meta.TransferSyntaxUID = target
    except MemoryError:
        raise  # the decoder pool's limit, named there
    except Exception as error:  # noqa: BLE001 (a missing plug-in, corrupt or unencodable pixels)
        raise TranscodingRefused(
            f"cannot convert {stored.name} to {target.name}: {error}"
        ) from error
    return dataset


def transcoded(
    content: bytes, syntax: str, message_encoding: tuple[bool, bool, bool] | None
) -> bytes:
    """The stored Part 10 file ``content`` in ``syntax``: a Part 10 file again, or with
    ``message_encoding`` (implicit VR, little endian, deflated: a presentation context's) its
    data set alone, as a DIMSE message carries it (PS3.7 6.3.1)."""
    try:
        dataset = pydicom.dcmread(io.BytesIO(content), force=True)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 (pydicom raises many kinds on a corrupt file)
        raise TranscodingRefused(f"the stored file cannot be read: {error}") from error
    transcode(dataset, syntax)
    if message_encoding is not None:
        encoded = encode(dataset, *message_encoding)
        if encoded is None:
            raise TranscodingRefused("the data set cannot be encoded")
        return encoded
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()
