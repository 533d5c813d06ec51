"""Ingest refuses what is over ``[limits]`` before doing the work, names the limit, and loses
nothing already stored (issue 17); on both backend pairs."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import text

from config.settings import LimitsSettings
from storage.archive import Archive, open_archive
from storage.dicom_file import read_instance_header
from storage.errors import InstanceTooComplex, InstanceTooLarge, InvalidInstance, StorageError
from storage.ingest import IngestOutcome, Received, ingest_file, ingest_files
from storage.query import Query, QueryLevel, locate_instances
from storage.verify import verify_archive
from tests import hostile_files
from tests.conftest import make_settings
from tests.factories import ct_instance, write_part10

REPOSITORY = Path(__file__).resolve().parents[2]

# name -> (how to build it, the error, the limit named in the reason)
HOSTILE: dict[str, tuple[Callable[[Path], Path], type[StorageError], str]] = {
    "sequences nested 10 000 deep": (
        lambda p: hostile_files.nested_sequences(p, 10_000),
        InstanceTooComplex,
        "limits.sequence_max_depth",
    ),
    "JPEG claiming 65535 x 65535 x 4 frames": (
        lambda p: hostile_files.jpeg_claiming(p, 65535, 65535, 4),
        InstanceTooLarge,
        "limits.frame_max_bytes",
    ),
    "Rows = Columns = 0 with 2 000 000 frames": (
        lambda p: hostile_files.zero_geometry(p, 2_000_000),
        InvalidInstance,
        "declared pixel geometry holds no pixel",
    ),
    "three frames in the bytes of one": (
        lambda p: hostile_files.frames_beyond_pixel_data(p, 3),
        InvalidInstance,
        "3 frame(s) of 512 need more",
    ),
    "deflated, inflating to 64 MiB past an 8 MiB cap": (
        lambda p: hostile_files.deflate_bomb(p, 64 << 20),
        InstanceTooLarge,
        "limits.inflated_max_bytes",
    ),
    "2 001 elements past a 2 000 cap": (
        lambda p: hostile_files.many_elements(p, 2_001),
        InstanceTooComplex,
        "limits.elements_max",
    ),
    "2 001 empty items past a 2 000 cap": (
        lambda p: hostile_files.many_items(p, 2_001),
        InstanceTooComplex,
        "limits.elements_max",
    ),
}
TEST_LIMITS = LimitsSettings(inflated_max_bytes=8 << 20, elements_max=2_000)


def _stored(archive: Archive) -> set[str]:
    query = Query(QueryLevel.IMAGE, {})
    return {instance.sop_instance_uid for instance in locate_instances(archive, query)}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_instance_is_refused_naming_the_limit_and_loses_nothing(
    archive: Archive, tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    archive = dataclasses.replace(archive, limits=TEST_LIMITS)
    good = write_part10(ct_instance(), tmp_path / "good.dcm")
    stored = ingest_file(archive, good)
    make, error_type, reason = HOSTILE[case]
    hostile = make(tmp_path / "hostile.dcm")

    with (
        caplog.at_level(logging.WARNING, logger="storage"),
        pytest.raises(error_type) as refused,
    ):
        ingest_file(archive, hostile)
    assert reason in str(refused.value)
    if reason.startswith("limits."):
        assert any(reason in record.getMessage() for record in caplog.records)

    # Nothing previously stored is lost, nothing half-written is left.
    assert _stored(archive) == {stored.sop_instance_uid}
    assert ingest_file(archive, good).outcome is IngestOutcome.DUPLICATE
    report = verify_archive(archive)
    assert report.ok


def test_refusals_in_a_group_leave_the_others_stored(archive: Archive, tmp_path: Path) -> None:
    archive = dataclasses.replace(archive, limits=TEST_LIMITS)
    good = [write_part10(ct_instance(seed=n), tmp_path / f"good{n}.dcm") for n in range(2)]
    hostile = [
        make(tmp_path / f"hostile{n}.dcm") for n, (make, _, _) in enumerate(HOSTILE.values())
    ]
    outcomes = ingest_files(archive, [Received(path) for path in [good[0], *hostile, good[1]]])
    assert [type(outcome) for outcome in outcomes[1:-1]] == [
        error_type for _, error_type, _ in HOSTILE.values()
    ]
    assert outcomes[0].outcome is IngestOutcome.STORED  # type: ignore[union-attr]
    assert outcomes[-1].outcome is IngestOutcome.STORED  # type: ignore[union-attr]
    assert len(_stored(archive)) == 2


def test_a_recursion_error_in_pydicom_is_a_refusal(tmp_path: Path) -> None:
    # With the nesting limit set beyond Python's recursion limit, pydicom's own recursion
    # fails; that too is a refusal naming the limit, never another exception.
    path = hostile_files.nested_sequences(tmp_path / "deep.dcm", 10_000)
    with pytest.raises(InstanceTooComplex, match="limits.sequence_max_depth"):
        read_instance_header(path, LimitsSettings(sequence_max_depth=1_000_000))


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (LimitsSettings(instance_max_bytes=1000), "limits.instance_max_bytes"),
        (LimitsSettings(decoded_max_bytes=2047), "limits.decoded_max_bytes"),
        (LimitsSettings(frame_max_bytes=2047), "limits.frame_max_bytes"),
        (LimitsSettings(frames_max=1), None),
    ],
)
def test_size_limits_are_checked_from_the_declared_geometry(
    tmp_path: Path, limits: LimitsSettings, reason: str | None
) -> None:
    # A 32 x 32 CT of 16 bits: 2 048 bytes decoded, one frame, ~2.5 kB stored.
    path = write_part10(ct_instance(), tmp_path / "ct.dcm")
    if reason is None:
        assert read_instance_header(path, limits).number_of_frames == 1
        return
    with pytest.raises(InstanceTooLarge, match=reason):
        read_instance_header(path, limits)


def test_frames_over_the_limit_are_refused(tmp_path: Path) -> None:
    path = hostile_files.frames_beyond_pixel_data(tmp_path / "f.dcm", 3)
    with pytest.raises(InstanceTooLarge, match="limits.frames_max"):
        read_instance_header(path, LimitsSettings(frames_max=2))


def test_a_small_deflated_instance_is_still_stored(archive: Archive, tmp_path: Path) -> None:
    path = hostile_files.small_deflated(tmp_path / "small.dcm")
    result = ingest_file(dataclasses.replace(archive, limits=TEST_LIMITS), path)
    assert result.outcome is IngestOutcome.STORED


_MEASURE = """
import json, resource, sys
from pathlib import Path
from storage.dicom_file import read_instance_header
from storage.errors import StorageError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_instance_header(Path(sys.argv[1]))
    outcome = "stored"
except StorageError as error:
    outcome = type(error).__name__
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "grown_kib": after - before}))
"""


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("deflated, 512 MiB inflated", lambda p: hostile_files.deflate_bomb(p, 512 << 20)),
        ("nested 10 000 deep", lambda p: hostile_files.nested_sequences(p, 10_000)),
        ("JPEG 65535 x 65535 x 4", lambda p: hostile_files.jpeg_claiming(p, 65535, 65535, 4)),
        ("0 x 0 x 2 000 000", lambda p: hostile_files.zero_geometry(p, 2_000_000)),
        ("1 100 000 empty items", lambda p: hostile_files.many_items(p, 1_100_000)),
    ],
)
def test_refusal_with_the_default_limits_stays_small_in_memory(
    tmp_path: Path, name: str, make: Callable[[Path], Path]
) -> None:
    """Peak RSS of a fresh process reading the hostile file with the default limits: what
    the refusal itself cost, measured after the imports (ru_maxrss only grows)."""
    path = make(tmp_path / "hostile.dcm")
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["outcome"] != "stored", name
    # The deflated file inflates in 1 MiB steps; the others never touch their pixels.
    assert measured["grown_kib"] < 32 * 1024, measured


def test_a_value_the_index_refuses_fails_its_own_file_only(
    postgres_url: str, tmp_path: Path
) -> None:
    """PostgreSQL refuses a value outside its column type (DataError): the file holding it is
    refused as Cannot Understand, the rest of its group is stored, no blob is left. A column
    narrowed to SMALLINT stands in for any value the index cannot hold."""
    settings = make_settings(tmp_path, database_url=postgres_url)
    archive = open_archive(settings, migrate=True)
    try:
        with archive.index.write() as session:
            session.execute(text("ALTER TABLE instance ALTER COLUMN instance_number TYPE smallint"))
        study, series = generate_uid(), generate_uid()
        files = []
        for n, number in enumerate([1, 40_000, 2]):
            ds = ct_instance(study, series, seed=n)
            ds.InstanceNumber = number
            files.append(write_part10(ds, tmp_path / f"{n}.dcm"))
        first, refused, last = ingest_files(archive, [Received(path) for path in files])
        assert isinstance(refused, InvalidInstance)
        assert "cannot hold a value" in str(refused)
        assert first.outcome is IngestOutcome.STORED  # type: ignore[union-attr]
        assert last.outcome is IngestOutcome.STORED  # type: ignore[union-attr]
        assert len(_stored(archive)) == 2
        assert verify_archive(archive).ok
    finally:
        archive.close()


def test_non_finite_numbers_are_stored_as_null_in_the_metadata(
    archive: Archive, tmp_path: Path
) -> None:
    # No JSON has NaN or Infinity; PostgreSQL's JSONB refused the whole row.
    ds = ct_instance()
    ds.DiffusionBValue = float("nan")  # FD, the fast path
    ds.add_new(0x00189327, "FL", [1.5, float("inf")])
    ds.add_new(0x00180088, "DS", "NaN")  # DS, pydicom's path
    ingest_file(archive, write_part10(ds, tmp_path / "nan.dcm"))
    query = Query(QueryLevel.IMAGE, {"SOPInstanceUID": ds.SOPInstanceUID})
    (stored,) = locate_instances(archive, query, with_metadata=True)
    metadata = stored.metadata or {}
    assert metadata["00189087"]["Value"] == [None]
    assert metadata["00189327"]["Value"] == [1.5, None]
    assert metadata["00180088"]["Value"] == [None]


def test_the_structure_pass_reads_past_its_window(tmp_path: Path) -> None:
    # 70 000 elements of 10 bytes: 700 kB of headers, past the pass's 256 KiB window.
    path = hostile_files.many_elements(tmp_path / "wide.dcm", 70_000)
    assert read_instance_header(path, LimitsSettings(elements_max=80_000)).number_of_frames == 1
    with pytest.raises(InstanceTooComplex, match="limits.elements_max"):
        read_instance_header(path, LimitsSettings(elements_max=69_999))
