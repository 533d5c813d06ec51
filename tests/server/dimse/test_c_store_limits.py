"""C-STORE of hostile instances (issue 17) against the running SCP, pynetdicom as the SCU:
each refused with its PS3.4 B.2.3 status and an Error Comment naming the limit; C-ECHO and a
normal C-STORE still served; nothing stored before is lost."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)

from server.dimse.ae import DimseServer
from storage.archive import open_archive
from storage.verify import verify_archive
from tests import hostile_files
from tests.conftest import make_settings
from tests.factories import ct_instance, write_part10
from tests.server.dimse.scu import echo_works, send_file_raw

CASES: list[tuple[str, Callable[[Path], Path], str, str, int, str]] = [
    (
        "nested 10 000 deep",
        lambda p: hostile_files.nested_sequences(p, 10_000),
        CTImageStorage,
        ExplicitVRLittleEndian,
        0xC000,
        "limits.sequence_max_depth",
    ),
    (
        "JPEG 65535 x 65535 x 4",
        lambda p: hostile_files.jpeg_claiming(p, 65535, 65535, 4),
        SecondaryCaptureImageStorage,
        JPEGBaseline8Bit,
        0xA700,
        "limits.frame_max_bytes",
    ),
    (
        "0 x 0 x 2 000 000",
        lambda p: hostile_files.zero_geometry(p, 2_000_000),
        CTImageStorage,
        ExplicitVRLittleEndian,
        0xC000,
        "Pixel Data with Rows 0",
    ),
    (
        "deflated past the cap",
        lambda p: hostile_files.deflate_bomb(p, 64 << 20),
        CTImageStorage,
        DeflatedExplicitVRLittleEndian,
        0xA700,
        "limits.inflated_max_bytes",
    ),
    (
        "too many elements",
        lambda p: hostile_files.many_elements(p, 2_001),
        CTImageStorage,
        ExplicitVRLittleEndian,
        0xC000,
        "limits.elements_max",
    ),
]


def test_hostile_instances_are_refused_with_status_and_comment(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, limits={"inflated_max_bytes": 8 << 20, "elements_max": 2_000}
    )
    archive = open_archive(settings, migrate=True)
    server = DimseServer(settings, archive)
    server.start()
    try:
        first = write_part10(ct_instance(), tmp_path / "first.dcm")
        assert send_file_raw(server, first, CTImageStorage, ExplicitVRLittleEndian).Status == 0
        for name, make, sop_class, syntax, status, comment in CASES:
            answer = send_file_raw(server, make(tmp_path / f"{status}.dcm"), sop_class, syntax)
            assert answer.Status == status, name
            assert comment in answer.ErrorComment, (name, answer.ErrorComment)
            assert echo_works(server), name
        after = write_part10(ct_instance(seed=3), tmp_path / "after.dcm")
        assert send_file_raw(server, after, CTImageStorage, ExplicitVRLittleEndian).Status == 0
        report = verify_archive(archive)
        assert report.ok and report.instances == 2, report
    finally:
        server.stop()
        archive.close()
