"""Auto-routing to DCMTK's storescp (TCP_NODELAY=1): a matching study arrives complete, a
destination that was down gets it once back, a study that does not match is not sent."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from config import Settings
from config.settings import ConfigError
from inference.stability import queue_stable_studies
from server.events.delivery import DeliveryLoop, subscribers_from_settings
from storage.archive import Archive
from storage.ingest import ingest_file
from storage.jobs import utc_now
from storage.outbox import subscriber_states
from tests.conftest import free_port, make_settings
from tests.factories import ct_instance, write_part10
from tests.waiting import wait_until

STORE_SCP = "/usr/bin/storescp"
PORT = free_port()


@contextlib.contextmanager
def storescp(directory: Path) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [STORE_SCP, "-aet", "WORKSTATION", "-od", str(directory), "+xa", str(PORT)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            assert process.poll() is None, "storescp exited"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", PORT)) == 0

        wait_until(listening, "storescp to listen", timeout_s=30, interval_s=0.05)
        yield directory
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(
        tmp_path,
        dimse={"peers": [{"ae_title": "WORKSTATION", "host": "127.0.0.1", "port": PORT}]},
        routing={
            "rules": [
                {
                    "name": "ct",
                    "match": {"Modality": "CT"},
                    "destination": "WORKSTATION",
                    "level": "study",
                },
            ]
        },  # fmt: skip
        events={"poll_interval_s": 0.05, "retry_backoff_s": 0.05, "max_backoff_s": 0.2},
    )


def send_study(archive: Archive, folder: Path, modality: str, count: int) -> set[str]:
    study = generate_uid()
    folder.mkdir()
    sent = set()
    for n in range(count):
        ds = ct_instance(study, seed=n, modality=modality)
        ingest_file(archive, write_part10(ds, folder / f"{n}.dcm"))
        sent.add(ds.SOPInstanceUID)
    return sent


def test_a_matching_study_reaches_a_destination_that_was_down(
    settings: Settings, archive: Archive, tmp_path: Path
) -> None:
    ct = send_study(archive, tmp_path / "ct", "CT", 3)
    send_study(archive, tmp_path / "mr", "MR", 2)
    queue_stable_studies(archive, settings, [], now=utc_now() + timedelta(minutes=5))
    loop = DeliveryLoop(settings, archive, subscribers_from_settings(settings, archive))

    loop.step()  # the destination is down: a failed attempt, retried later
    state = subscriber_states(archive)["route-ct"]
    assert state["attempts"] == 1 and "WORKSTATION" in state["last_error"]

    with storescp(tmp_path / "received") as received:
        wait_until(lambda: loop.step() == 0 and len(list(received.iterdir())) >= 3, "the CT", 60)
        arrived = {str(pydicom.dcmread(p).SOPInstanceUID) for p in received.iterdir()}
    assert arrived == ct  # complete, and the MR study not sent
    state = subscriber_states(archive)["route-ct"]
    # Both study.stable events were handled; only the CT one matched.
    assert state["attempts"] == 0 and state["delivered"] == 2


def test_a_rule_on_a_key_hilum_cannot_match_is_a_configuration_error(
    tmp_path: Path, archive: Archive
) -> None:
    settings = make_settings(
        tmp_path,
        dimse={"peers": [{"ae_title": "WORKSTATION", "host": "127.0.0.1", "port": PORT}]},
        routing={
            "rules": [{"name": "x", "match": {"Manufacturer": "X"}, "destination": "WORKSTATION"}]
        },
    )
    with pytest.raises(ConfigError, match="Manufacturer is not a key"):
        subscribers_from_settings(settings, archive)


def test_a_destination_that_is_not_known_fails_the_delivery_with_the_reason(
    tmp_path: Path, archive: Archive
) -> None:
    """Destinations are managed at run time (`hilum peers`): one unknown when the study is
    sent fails that delivery (retried, then dead-lettered), with the reason."""
    settings = make_settings(
        tmp_path,
        routing={"rules": [{"name": "y", "destination": "NOBODY", "level": "study"}]},
        events={"poll_interval_s": 0.05, "retry_backoff_s": 0.05, "max_backoff_s": 0.2},
    )
    send_study(archive, tmp_path / "ct", "CT", 1)
    queue_stable_studies(archive, settings, [], now=utc_now() + timedelta(minutes=5))
    loop = DeliveryLoop(settings, archive, subscribers_from_settings(settings, archive))
    loop.step()
    state = subscriber_states(archive)["route-y"]
    assert state["attempts"] == 1 and "NOBODY is not a known destination" in state["last_error"]
