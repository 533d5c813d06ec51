"""Another transfer syntax for a stored instance: for a C-MOVE / C-GET peer that does not accept
the stored one, and for a WADO-RS / WADO-URI client that asks for another.

Transcoding decodes the whole pixel data in memory (pydicom's plug-ins: pylibjpeg, openjpeg,
RLE), so an instance larger than ``[server] transcode_max_bytes`` (stored or decoded, as
declared) is refused before it is read; it can still be retrieved as stored. The rest runs in a
decoder process (:mod:`storage.decoder_pool`), under ``[limits] decode_memory_mb`` and
``decode_timeout_s``.
"""

from __future__ import annotations

from io import BytesIO

import pydicom
from pydicom.dataset import Dataset

from storage.archive import Archive
from storage.dicom_file import integer_value
from storage.errors import DecodeFailed, InstanceTooLarge
from storage.limits import check_decode_budget
from storage.pixel_decoding import TranscodingRefused, transcoded
from storage.query import StoredInstance

__all__ = ["TranscodingRefused", "check_size", "transcoded_instance"]


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


def transcoded_instance(
    archive: Archive,
    stored: StoredInstance,
    syntax: str,
    limit: int,
    message_encoding: tuple[bool, bool, bool] | None = None,
) -> bytes:
    """The stored instance in ``syntax``: a Part 10 file, or its data set alone encoded as
    ``message_encoding`` says (:func:`storage.pixel_decoding.transcoded`). Its sizes are
    checked against ``limit`` (``[server] transcode_max_bytes``) before the file is read whole,
    and from its header before it is decoded."""
    check_size(stored.size, Dataset(), limit)
    with archive.blobs.open(stored.blob_key, tier=stored.tier) as blob:
        content = blob.read()
    try:
        header = pydicom.dcmread(BytesIO(content), stop_before_pixels=True, force=True)
    except Exception as error:  # noqa: BLE001 (pydicom raises many kinds on a corrupt file)
        raise TranscodingRefused(f"the stored file cannot be read: {error}") from error
    check_size(stored.size, header, limit)
    try:
        check_decode_budget(
            integer_value(header, "Rows") or 0,
            integer_value(header, "Columns") or 0,
            integer_value(header, "SamplesPerPixel") or 1,
            integer_value(header, "BitsAllocated") or 8,
            max(1, integer_value(header, "NumberOfFrames") or 1),
            archive.limits,
        )
    except InstanceTooLarge as error:
        raise TranscodingRefused(f"{error}; available as stored only") from None
    try:
        return archive.decoders.run(transcoded, content, syntax, message_encoding)
    except DecodeFailed as failed:
        raise TranscodingRefused(str(failed)) from failed
