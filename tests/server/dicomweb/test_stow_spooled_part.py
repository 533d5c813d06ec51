"""A STOW-RS part as it is spooled (server/dicomweb/stow.py ``SpooledPart``): the file holds
the part's bytes, with the PS3.10 7.1 preamble and prefix added where the part starts with
File Meta Information without them, and the SHA-256 and size handed to ingest are those of
the file, however the part's bytes were cut into writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from server.dicomweb.stow import SpooledPart

WITH_PREAMBLE = bytes(128) + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + bytes(4) + b"rest" * 40
WITHOUT_PREAMBLE = b"\x02\x00\x00\x00UL\x04\x00" + bytes(4) + b"rest" * 40
# Starts with group 0002 and has "DICM" at 128: a preamble that happens to begin 02 00.
PREAMBLE_LIKE_GROUP_2 = b"\x02\x00" + bytes(126) + b"DICM" + b"x" * 50


def spooled(tmp_path: Path, content: bytes, step: int) -> SpooledPart:
    part = SpooledPart(tmp_path)
    for at in range(0, len(content), step):
        part.write(memoryview(content)[at : at + step])
    part.seek(0)
    part.close()
    return part


@pytest.mark.parametrize("step", [1, 2, 131, 132, 133, 1 << 20])
@pytest.mark.parametrize(
    ("content", "stored"),
    [
        (WITH_PREAMBLE, WITH_PREAMBLE),
        (WITHOUT_PREAMBLE, bytes(128) + b"DICM" + WITHOUT_PREAMBLE),
        (PREAMBLE_LIKE_GROUP_2, PREAMBLE_LIKE_GROUP_2),
        (b"\x02\x00short", bytes(128) + b"DICM" + b"\x02\x00short"),  # shorter than a preamble
        (b"not dicom at all", b"not dicom at all"),  # refused later by the header parse
        (b"", b""),
    ],
    ids=["preamble", "no-preamble", "group-2-preamble", "short", "not-dicom", "empty"],
)
def test_the_file_its_hash_and_size_whatever_the_writes(
    tmp_path: Path, content: bytes, stored: bytes, step: int
) -> None:
    part = spooled(tmp_path, content, step)
    assert part.path.parent == tmp_path and part.path.name.startswith("tmp")
    assert part.path.read_bytes() == stored
    assert part.size == len(stored)
    assert part.digest.hexdigest() == hashlib.sha256(stored).hexdigest()


def test_closing_twice_is_harmless(tmp_path: Path) -> None:
    part = spooled(tmp_path, WITH_PREAMBLE, 64)
    part.close()
    assert part.path.read_bytes() == WITH_PREAMBLE
