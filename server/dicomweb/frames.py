"""Frames of a stored instance: read with one ranged read each from the blob store, using the
byte ranges recorded at ingest (never the whole file), and decoded only when asked, in a
decoder process (:mod:`storage.decoder_pool`) once the declared sizes are checked.

An instance without recorded ranges (deflated, or fragments that cannot be assigned to frames)
is copied and parsed once per request, whatever the number of frames asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any, TypeVar

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID

from server.dicomweb.media_types import NotAcceptable
from server.dicomweb.spool import Spool
from storage.archive import Archive
from storage.encapsulated_frame import check_frame_header
from storage.errors import DecodeFailed, InstanceTooLarge, InvalidInstance, InvalidQuery, NotFound
from storage.limits import check_decode_budget, check_decoded_size
from storage.pixel_decoding import PIXEL_MODULE, attributes, is_small_native, native_frame
from storage.query import StoredInstance

T = TypeVar("T")

_ITEM_HEADER = 8  # PS3.5 A.4: (FFFE,E000) tag and a 4-byte length before each fragment


class FrameNotFound(NotFound):
    """A frame number outside 1..NumberOfFrames."""


def parse_frame_list(text: str) -> list[int]:
    """PS3.18 8.3.3.1.5: ``/frames/1,3,7``, one-based."""
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"frame list {text[:80]!r} is not comma-separated numbers") from None
    if not numbers or min(numbers) < 1:
        raise ValueError("frame numbers start at 1")
    return numbers


def check_frames(instance: StoredInstance, numbers: list[int]) -> None:
    """Every number names a frame of ``instance``: 400 below 1, 404 beyond the last."""
    if any(n < 1 for n in numbers):
        raise InvalidQuery("frame numbers start at 1 (PS3.18 8.3.3.1.5)")
    if instance.frame_ranges is None and not instance.number_of_frames:
        raise FrameNotFound(f"instance {instance.sop_instance_uid} has no frames")
    for n in numbers:
        if n > instance.number_of_frames:
            raise FrameNotFound(
                f"instance {instance.sop_instance_uid} has {instance.number_of_frames} "
                f"frame(s), not {n}"
            )


def _first_int(metadata: dict[str, Any], tag: str, default: int) -> int:
    values = metadata.get(tag, {}).get("Value")
    try:
        return int(values[0]) if values else default
    except (TypeError, ValueError):
        return default


def check_decodable(instance: StoredInstance, archive: Archive, frames: int = 1) -> None:
    """Refuse (406, available as stored) to decode ``frames`` frames of ``instance`` at once
    when their decoded size, from the stored Image Pixel attributes (PS3.3 C.7.6.3), is over
    ``[limits]``: checked before anything is read or allocated. An instance stored before a
    lower limit is refused here rather than decoded."""
    metadata = instance.metadata or {}
    geometry = (
        _first_int(metadata, "00280010", 0),
        _first_int(metadata, "00280011", 0),
        _first_int(metadata, "00280002", 1),
        _first_int(metadata, "00280100", 8),
        frames,
        archive.limits,
    )
    try:
        check_decoded_size(*geometry)
        check_decode_budget(*geometry)
    except InstanceTooLarge as error:
        raise NotAcceptable(
            f"instance {instance.sop_instance_uid} is not decoded: {error}; retrieve it as stored"
        ) from None


class FrameReader:
    """Reads frames and headers of stored instances; ``instance.frame_ranges`` must have been
    located (``with_frame_ranges=True``) for the ranged reads to be used."""

    def __init__(self, archive: Archive, spool: Spool) -> None:
        self.archive = archive
        self.spool = spool

    def read_frame(self, instance: StoredInstance, number: int) -> bytes:
        """The stored bytes of frame ``number`` (one-based): the fragments of an encapsulated
        frame joined, or the native frame's pixels, from a single ranged read."""
        if instance.frame_ranges is None:
            return next(self._frames_from_whole_file(instance, [number]))
        # Only this frame's entry of the table is read (storage.frame_table).
        fragments = instance.frame_ranges.byte_ranges(number)
        start = fragments[0][0]
        end = fragments[-1][0] + fragments[-1][1]
        data = self.archive.blobs.get_range(
            instance.blob_key, start, end - start, tier=instance.tier
        )
        if len(fragments) == 1:
            return data
        # The fragments of one frame lie one after another, each behind its item header.
        return b"".join(
            data[offset - start : offset - start + length] for offset, length in fragments
        )

    def frames(
        self, instance: StoredInstance, numbers: list[int], *, decode: bool
    ) -> Iterator[bytes]:
        """The frames, stored or decoded; the decode limit is checked here, before the first
        frame is read."""
        if decode:
            check_decodable(instance, self.archive)
        if instance.frame_ranges is None:
            stored: Iterator[bytes] = self._frames_from_whole_file(instance, numbers)
        else:
            stored = (self.read_frame(instance, number) for number in numbers)
        if not decode:
            return stored
        return (native_frame_of(self.archive, instance, frame) for frame in stored)

    def read_header(self, instance: StoredInstance) -> Dataset:
        """The data set up to the Pixel Data element, read without fetching the pixels."""
        if instance.frame_ranges is not None:
            head = self.archive.blobs.get_range(
                instance.blob_key, 0, instance.frame_ranges.pixel_data_at, tier=instance.tier
            )
            return pydicom.dcmread(BytesIO(head), stop_before_pixels=True)
        with self.spool.copy_of(self.archive, instance.blob_key, instance.tier) as copy:
            return pydicom.dcmread(copy, stop_before_pixels=True)

    def _frames_from_whole_file(
        self, instance: StoredInstance, numbers: list[int]
    ) -> Iterator[bytes]:
        """The stored bytes of each of ``numbers``, from one copy of the file parsed once."""
        with self.spool.copy_of(self.archive, instance.blob_key, instance.tier) as copy:
            ds = pydicom.dcmread(copy)
            if "PixelData" not in ds:
                raise FrameNotFound(f"instance {instance.sop_instance_uid} has no pixel data")
            count = instance.number_of_frames
            if ds.file_meta.TransferSyntaxUID.is_encapsulated:
                wanted = set(numbers)
                found = {
                    index: frame
                    for index, frame in enumerate(
                        generate_frames(ds.PixelData, number_of_frames=count), start=1
                    )
                    if index in wanted
                }
                for number in numbers:
                    if number not in found:
                        raise FrameNotFound(f"frame {number} is missing from the pixel data")
                    yield found[number]
                return
            check_decodable(instance, self.archive, count)  # decodes every frame at once
            pixels = ds.pixel_array.reshape(count, -1)
            little = pixels.astype(pixels.dtype.newbyteorder("<"))
            for number in numbers:
                yield little[number - 1].tobytes()


def check_codestream(instance: StoredInstance, frame: bytes) -> None:
    """406 for a frame whose codestream declares another size than the data set: a decoder
    allocates what the codestream says (:mod:`storage.encapsulated_frame`)."""
    metadata = instance.metadata or {}
    try:
        check_frame_header(
            instance.transfer_syntax_uid,
            frame,
            _first_int(metadata, "00280010", 0),
            _first_int(metadata, "00280011", 0),
            _first_int(metadata, "00280002", 1),
            _first_int(metadata, "00280100", 8),
        )
    except InvalidInstance as error:
        raise NotAcceptable(f"the frame is not decoded: {error}; retrieve it as stored") from None


def decoded(
    archive: Archive, instance: StoredInstance, function: Callable[..., T], *args: Any
) -> T:
    """``function(*args)``, a decode of :mod:`storage.pixel_decoding`, in a decoder process
    (:mod:`storage.decoder_pool`), or here for a small native frame
    (:func:`storage.pixel_decoding.is_small_native`); a decode that fails or passes a
    ``[limits]`` budget is 406 with the reason (the instance is still available as stored)."""
    small = is_small_native(instance.metadata or {}, instance.transfer_syntax_uid)
    try:
        return archive.decoders.run(function, *args, in_process=small)
    except DecodeFailed as error:
        raise NotAcceptable(
            f"instance {instance.sop_instance_uid} is not decoded: {error}; retrieve it as stored"
        ) from None


def native_frame_of(archive: Archive, instance: StoredInstance, frame: bytes) -> bytes:
    """The frame as native little-endian pixels (PS3.18 8.7.3.3.2 octet-stream): a native
    little-endian frame as it is, another one decoded."""
    syntax = UID(instance.transfer_syntax_uid)
    if not syntax.is_encapsulated and syntax.is_little_endian:
        return frame
    check_codestream(instance, frame)
    module = attributes(instance.metadata or {}, PIXEL_MODULE)
    return decoded(archive, instance, native_frame, module, syntax, frame)
