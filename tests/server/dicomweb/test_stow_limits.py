"""STOW-RS refuses hostile instances (issue 17) per instance, with the Failure Reason of
PS3.18 10.5.3 (A700 over a size limit, C000 cannot understand), and keeps serving."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import requests
from pydicom.dataset import Dataset

from config import Settings
from config.settings import LimitsSettings
from storage.archive import Archive
from storage.verify import verify_archive
from tests import hostile_files
from tests.server.dicomweb.conftest import ct_series, serve
from tests.server.dicomweb.test_stow import STOW_TYPE, multipart, part10, stored_uids

LIMITS = LimitsSettings(inflated_max_bytes=8 << 20, elements_max=2_000)


def hostile_parts(folder: Path) -> list[tuple[bytes, int]]:
    """(file, expected Failure Reason) of each hostile case."""
    cases = [
        (hostile_files.nested_sequences(folder / "deep.dcm", 10_000), 0xC000),
        (hostile_files.jpeg_claiming(folder / "jpeg.dcm", 65535, 65535, 4), 0xA700),
        (hostile_files.zero_geometry(folder / "zero.dcm", 2_000_000), 0xC000),
        (hostile_files.frames_beyond_pixel_data(folder / "frames.dcm", 3), 0xC000),
        (hostile_files.deflate_bomb(folder / "bomb.dcm", 64 << 20), 0xA700),
        (hostile_files.many_elements(folder / "many.dcm", 2_001), 0xC000),
    ]
    return [(path.read_bytes(), reason) for path, reason in cases]


def test_hostile_parts_fail_each_with_its_reason_and_good_parts_are_stored(
    settings: Settings, archive: Archive, tmp_path: Path
) -> None:
    archive = dataclasses.replace(archive, limits=LIMITS)
    server = serve(settings, archive)
    try:
        base_url = f"http://127.0.0.1:{server.port}/dicomweb"
        earlier = ct_series(1)
        assert (
            requests.post(
                f"{base_url}/studies",
                data=multipart([part10(earlier[0])]),
                headers={"Content-Type": STOW_TYPE},
                timeout=60,
            ).status_code
            == 200
        )
        hostile = hostile_parts(tmp_path)
        good = ct_series(2)

        response = requests.post(
            f"{base_url}/studies",
            data=multipart([part10(good[0]), *(body for body, _ in hostile), part10(good[1])]),
            headers={"Content-Type": STOW_TYPE},
            timeout=120,
        )
        assert response.status_code == 202, response.text
        body = Dataset.from_json(response.json())
        assert [item.FailureReason for item in body.FailedSOPSequence] == [
            reason for _, reason in hostile
        ]
        assert [item.ReferencedSOPInstanceUID for item in body.ReferencedSOPSequence] == [
            ds.SOPInstanceUID for ds in good
        ]

        # Only hostile parts: 409 (PS3.18 10.5.3.1), each with its reason.
        response = requests.post(
            f"{base_url}/studies",
            data=multipart([body for body, _ in hostile]),
            headers={"Content-Type": STOW_TYPE},
            timeout=120,
        )
        assert response.status_code == 409, response.text
        failed = Dataset.from_json(response.json()).FailedSOPSequence
        assert [item.FailureReason for item in failed] == [reason for _, reason in hostile]

        # Still serving; nothing earlier lost; nothing left half-written.
        found = requests.get(
            f"{base_url}/studies",
            params={"StudyInstanceUID": earlier[0].StudyInstanceUID},
            timeout=60,
        )
        assert found.status_code == 200 and len(found.json()) == 1
        assert stored_uids(archive, earlier[0].StudyInstanceUID) == {earlier[0].SOPInstanceUID}
        assert stored_uids(archive, good[0].StudyInstanceUID) == {ds.SOPInstanceUID for ds in good}
        assert verify_archive(archive).ok
    finally:
        server.stop()
