"""Property: whatever bytes arrive, reading the header either succeeds or raises storage's
domain error (issue 17); never another exception (which C-STORE answers as an internal error
and STOW-RS as a 500), and in bounded time. Valid files mutated the ways an attacker or a broken
device would: bytes flipped, lengths rewritten, the file cut, bytes inserted."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from config.settings import LimitsSettings
from storage.archive import Archive
from storage.dicom_file import read_instance_header
from storage.errors import StorageError
from storage.ingest import ingest_file
from storage.verify import verify_archive
from tests import hostile_files
from tests.factories import ct_instance, write_part10

LIMITS = LimitsSettings(inflated_max_bytes=1 << 20, elements_max=5_000)


def _seeds(folder: Path) -> list[bytes]:
    explicit = ct_instance(size=8)
    implicit = ct_instance(size=8, seed=1)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    rle = ct_instance(size=8, seed=2)
    rle.compress(RLELossless)
    paths = [
        write_part10(explicit, folder / "explicit.dcm"),
        write_part10(implicit, folder / "implicit.dcm"),
        write_part10(rle, folder / "rle.dcm"),
        hostile_files.nested_sequences(folder / "nested.dcm", 5),
        hostile_files.small_deflated(folder / "deflated.dcm"),
        hostile_files.jpeg_claiming(folder / "jpeg.dcm", 16, 16, 2),
    ]
    return [path.read_bytes() for path in paths]


_SEEDS: list[bytes] = []


def _seed(folder: Path, index: int) -> bytes:
    if not _SEEDS:
        _SEEDS.extend(_seeds(folder))
    return _SEEDS[index % len(_SEEDS)]


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(
        st.just("length"),
        st.integers(0, 1 << 16),
        st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF]),
    ),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.integers(0, 255)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        at = 132 + where % max(1, len(out) - 132)  # past the preamble, or nothing is read
        if kind == "flip" and at < len(out):
            out[at] = value
        elif kind == "length" and at + 4 <= len(out):
            out[at : at + 4] = struct.pack("<L", value)
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = bytes([value]) * 8
    return bytes(out)


@settings(
    max_examples=300,
    deadline=2000,  # ms per example: a hang is a failure, not a slow test
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(
    seed=st.integers(0, 5),
    mutations=st.lists(_MUTATION, min_size=1, max_size=4),
)
def test_any_mutated_file_is_read_or_refused_with_a_domain_error(
    tmp_path: Path, seed: int, mutations: list[tuple[str, int, int]]
) -> None:
    path = tmp_path / "mutated.dcm"
    path.write_bytes(_mutate(_seed(tmp_path, seed), mutations))
    with contextlib.suppress(StorageError):
        read_instance_header(path, LIMITS)


@settings(
    max_examples=120,
    deadline=5000,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(
    seed=st.integers(0, 5),
    mutations=st.lists(_MUTATION, min_size=1, max_size=3),
)
def test_any_mutated_file_is_stored_or_refused_with_a_domain_error(
    archive: Archive, tmp_path: Path, seed: int, mutations: list[tuple[str, int, int]]
) -> None:
    """The whole ingest (metadata JSON, index rows, PostgreSQL's own refusals) on both
    backends; whatever is stored stays verifiable."""
    path = tmp_path / "mutated.dcm"
    path.write_bytes(_mutate(_seed(tmp_path, seed), mutations))
    with contextlib.suppress(StorageError):
        ingest_file(dataclasses.replace(archive, limits=LIMITS), path)
    assert verify_archive(archive, checksums=False).ok
