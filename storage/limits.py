"""The ``[limits]`` of one received object, checked before the work each one bounds.

Sizes are checked from what the file declares (its length, its Image Pixel attributes), before
anything is read, decoded or allocated. Structure (sequence nesting, element count) is checked
by :mod:`storage.data_set_structure` before pydicom parses the data set, since pydicom reads
nested sequences recursively and holds every element it reads.
"""

from __future__ import annotations

import logging
from typing import NoReturn

from config.settings import LimitsSettings
from storage.errors import InstanceTooComplex, InstanceTooLarge

log = logging.getLogger(__name__)


def refuse_too_large(message: str, limit: str, value: int) -> NoReturn:
    """Raise :class:`InstanceTooLarge` naming ``limits.<limit>``, and log it (no patient
    data: the message holds sizes and counts only)."""
    # The limit first: a C-STORE Error Comment keeps 64 characters.
    text = f"over limits.{limit} ({value}): {message}"
    log.warning("refused an instance: %s", text)
    raise InstanceTooLarge(text, limit)


def refuse_too_complex(message: str, limit: str, value: int) -> NoReturn:
    text = f"over limits.{limit} ({value}): {message}"
    log.warning("refused an instance: %s", text)
    raise InstanceTooComplex(text, limit)


def check_stored_size(size: int, limits: LimitsSettings) -> None:
    if size > limits.instance_max_bytes:
        refuse_too_large(
            f"the file has {size} bytes", "instance_max_bytes", limits.instance_max_bytes
        )


def frame_bytes(rows: int, columns: int, samples_per_pixel: int, bits_allocated: int) -> int:
    """Decoded bytes of one frame (PS3.3 C.7.6.3.1; 1-bit frames rounded up to whole bytes)."""
    return (rows * columns * samples_per_pixel * bits_allocated + 7) // 8


def check_decoded_size(
    rows: int,
    columns: int,
    samples_per_pixel: int,
    bits_allocated: int,
    frames: int,
    limits: LimitsSettings,
) -> None:
    """Refuse a declared geometry whose frame count, decoded frame or decoded instance is over
    its limit; the values are what the data set declares, before any pixel is read."""
    if frames > limits.frames_max:
        refuse_too_large(f"Number of Frames is {frames}", "frames_max", limits.frames_max)
    one = frame_bytes(rows, columns, samples_per_pixel, bits_allocated)
    if one > limits.frame_max_bytes:
        refuse_too_large(
            f"one frame of {rows} x {columns} x {samples_per_pixel} samples of "
            f"{bits_allocated} bits decodes to {one} bytes",
            "frame_max_bytes",
            limits.frame_max_bytes,
        )
    if one * frames > limits.decoded_max_bytes:
        refuse_too_large(
            f"{frames} frames decode to {one * frames} bytes",
            "decoded_max_bytes",
            limits.decoded_max_bytes,
        )


def check_decode_budget(
    rows: int,
    columns: int,
    samples_per_pixel: int,
    bits_allocated: int,
    frames: int,
    limits: LimitsSettings,
) -> None:
    """Refuse a decode of ``frames`` frames whose output alone, as declared, is over what one
    decode may use (``decode_memory_mb``): it could only fail in its decoder process. The data
    set may well be within the ingest limits; it is then available as stored only."""
    size = frame_bytes(rows, columns, samples_per_pixel, bits_allocated) * frames
    if size > limits.decode_memory_mb << 20:
        refuse_too_large(
            f"{frames} frame(s) of {rows} x {columns} x {samples_per_pixel} samples of "
            f"{bits_allocated} bits decode to {size} bytes",
            "decode_memory_mb",
            limits.decode_memory_mb,
        )
