"""Another transfer syntax for a stored instance: for a C-MOVE / C-GET peer that does not accept
the stored one, and for a WADO-RS / WADO-URI client that asks for another.

Transcoding decodes the pixel data in memory (pydicom's plug-ins: pylibjpeg, openjpeg, RLE), so
an instance larger than ``[server] transcode_max_bytes`` (stored or decoded) is refused; it can
still be retrieved as stored.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID

from storage.encapsulated_frame import check_data_set_frames


class TranscodingRefused(Exception):
    """This instance cannot be given in that transfer syntax; the message says why."""


def check_size(stored_size: int, header: Dataset, limit: int) -> None:
    """Refuse an instance whose stored file or decoded pixel data exceeds ``limit`` bytes."""
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    bits = int(header.get("BitsAllocated", 8) or 8)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    pixels = int(header.get("Rows", 0) or 0) * int(header.get("Columns", 0) or 0)
    size = max(stored_size, pixels * samples * frames * bits // 8)
    if size > limit:
        raise TranscodingRefused(
            f"{size >> 20} MiB to transcode in memory, over [server] transcode_max_bytes "
            f"({limit >> 20} MiB); available as stored only"
        )


def transcode(dataset: Dataset, syntax: str) -> Dataset:
    """``dataset`` (read from its stored file) re-encoded in ``syntax``, in place.

    The SOP Instance UID is kept: only the encoding changes, not the image (PS3.5 8.2; PS3.18
    8.7.3.5). pydicom would generate a new UID by default. A deflated data set is already
    inflated by pydicom when read; a big endian one is refused (its pixel data would need byte
    swapping).
    """
    stored = UID(dataset.file_meta.TransferSyntaxUID)
    target = UID(syntax)
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
    except Exception as error:  # noqa: BLE001 (a missing plug-in, corrupt or unencodable pixels)
        raise TranscodingRefused(
            f"cannot convert {stored.name} to {target.name}: {error}"
        ) from error
    return dataset
