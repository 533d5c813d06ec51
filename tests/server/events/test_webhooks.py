"""Webhooks from the change feed: a real receiver that refuses, goes down and comes back gets
every event at least once, in order, signed; dead letters and their replay; a killed Hilum
loses no event."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from config import Settings
from server.app import create_app
from server.events.delivery import DeliveryLoop, subscribers_from_settings
from storage.archive import Archive, open_archive
from storage.events import changes
from storage.ingest import ingest_file
from tests.conftest import free_port, make_settings
from tests.factories import DCMTK_STORESCU, ct_instance, write_part10
from tests.server.events.receiver import Receiver
from tests.server.test_cli import HILUM, hilum_env
from tests.waiting import wait_until

SECRET = "test-webhook-secret-0123456789"
FAST_RETRIES = {
    "poll_interval_s": 0.05,
    "retry_backoff_s": 0.02,
    "max_backoff_s": 0.2,
    "timeout_s": 5,
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver(free_port(), SECRET)
    yield receiver
    if receiver._server is not None:
        receiver.down()


def webhook_settings(tmp_path: Path, receiver: Receiver, **events: object) -> Settings:
    secret = tmp_path / "webhook-secret"
    secret.write_text(SECRET + "\n")
    webhook = {"name": "engine", "url": receiver.url, "secret_file": secret}
    return make_settings(tmp_path, events={"webhooks": [webhook], **FAST_RETRIES, **events})


@pytest.fixture
def delivery(settings: Settings, archive: Archive) -> Iterator[DeliveryLoop]:
    loop = DeliveryLoop(settings, archive, subscribers_from_settings(settings, archive))
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    yield loop
    stop.set()
    thread.join(30)


def store(archive: Archive, folder: Path, count: int) -> None:
    study = generate_uid()
    folder.mkdir(exist_ok=True)
    for n in range(count):
        ds = ct_instance(study, seed=n)
        ingest_file(archive, write_part10(ds, folder / f"{ds.SOPInstanceUID}.dcm"))


class TestDelivery:
    @pytest.fixture
    def settings(self, tmp_path: Path, receiver: Receiver) -> Settings:
        return webhook_settings(tmp_path, receiver)

    def test_a_receiver_that_refuses_and_goes_down_gets_every_event_in_order(
        self, archive: Archive, receiver: Receiver, delivery: DeliveryLoop, tmp_path: Path
    ) -> None:
        receiver.refuse_next = 3
        receiver.up()
        store(archive, tmp_path / "first", 8)
        wait_until(lambda: len(receiver.accepted_ids) == 8, "the first events", timeout_s=60)
        receiver.down()
        store(archive, tmp_path / "second", 8)  # delivered to nobody: it is down
        wait_until(
            lambda: archive_state(archive)["engine"]["attempts"] >= 2,
            "failed attempts while the receiver is down",
            timeout_s=60,
        )
        receiver.up()
        every = [event.id for event in changes(archive, 0, 100)]
        wait_until(lambda: set(receiver.accepted_ids) == set(every), "every event", timeout_s=60)
        accepted = receiver.accepted_ids
        assert accepted == sorted(accepted)  # in order (a repeat would sit next to its first)
        assert sorted(set(accepted)) == every
        assert receiver.bad_signatures == 0
        assert receiver.requests > len(accepted)  # it did refuse some
        assert {body["type"] for body in receiver.accepted} == {"instance.stored"}

    def test_a_refused_event_is_dead_lettered_then_replayed(
        self, settings: Settings, archive: Archive, receiver: Receiver, tmp_path: Path
    ) -> None:
        settings = settings.model_copy(
            update={"events": settings.events.model_copy(update={"max_attempts": 2})}
        )
        loop = DeliveryLoop(settings, archive, subscribers_from_settings(settings, archive))
        receiver.refuse_types = {"study.deleted"}
        receiver.up()
        store(archive, tmp_path / "a", 1)
        (stored,) = changes(archive)
        from storage.delete import delete_study

        delete_study(archive, stored.study_instance_uid)
        store(archive, tmp_path / "b", 1)
        every = [event.id for event in changes(archive)]
        wait_until(lambda: loop.step() == 0 and len(receiver.accepted_ids) == 2, "delivery", 30)
        assert receiver.accepted_ids == [every[0], every[2]]  # the refused one is passed

        client = create_app(settings, archive).test_client()
        (hook,) = client.get("/api/webhooks").get_json()
        assert hook["name"] == "engine" and hook["position"] == every[2]
        assert hook["dead_letters"] == {"dead": 1} and hook["delivered"] == 2
        (letter,) = client.get("/api/webhooks/engine/dead-letters").get_json()
        assert letter["event"] == every[1] and letter["attempts"] == 2
        assert "HTTP 500" in letter["last_error"]

        receiver.refuse_types = set()
        replayed = client.post(f"/api/webhooks/engine/dead-letters/{letter['id']}/replay")
        assert replayed.status_code == 202
        loop.step()
        assert receiver.accepted_ids[-1] == every[1]
        (letter,) = client.get("/api/webhooks/engine/dead-letters").get_json()
        assert letter["state"] == "replayed"
        assert client.post("/api/webhooks/nobody/dead-letters/1/replay").status_code == 404
        assert client.get("/api/webhooks/engine/dead-letters?state=odd").status_code == 400


def archive_state(archive: Archive) -> dict:
    from storage.outbox import subscriber_states

    return subscriber_states(archive)


def test_change_feed_api(settings: Settings, archive: Archive, tmp_path: Path) -> None:
    store(archive, tmp_path, 3)
    client = create_app(settings, archive).test_client()
    page = client.get("/api/changes?since=0&limit=2").get_json()
    assert [e["type"] for e in page["events"]] == ["instance.stored"] * 2
    assert page["next"] == page["events"][-1]["id"]
    rest = client.get(f"/api/changes?since={page['next']}").get_json()
    assert len(rest["events"]) == 1 and rest["events"][0]["id"] > page["next"]
    assert client.get(f"/api/changes?since={rest['next']}").get_json() == {
        "events": [],
        "next": rest["next"],
    }
    assert client.get("/api/changes?since=x").status_code == 400
    assert client.get("/api/changes?type=nope").status_code == 400
    assert client.get("/api/changes?type=study.deleted").get_json()["events"] == []


def test_a_killed_hilum_loses_no_event(tmp_path: Path, receiver: Receiver) -> None:
    """The receiver is down while `hilum serve` receives a study; serve is killed (SIGKILL)
    right after; `hilum events` started later delivers every stored instance's event."""
    settings = webhook_settings(tmp_path, receiver)
    config = tmp_path / "hilum.toml"
    config.write_text(
        # lease_s: the killed serve held the lease; `hilum events` takes it over once expired.
        "[events]\npoll_interval_s = 0.05\nretry_backoff_s = 0.05\nmax_backoff_s = 0.2\n"
        "lease_s = 2\n"
        f'[[events.webhooks]]\nname = "engine"\nurl = "{receiver.url}"\n'
        'secret_env = "HILUM_TEST_WEBHOOK_SECRET"\n'
    )
    env = hilum_env(
        settings,
        HILUM_CONFIG=str(config),
        HILUM_TEST_WEBHOOK_SECRET=SECRET,
        HILUM_INFERENCE__SERVE_WORKER="false",
    )
    study = generate_uid()
    files = [write_part10(ct_instance(study, seed=n), tmp_path / f"{n}.dcm") for n in range(6)]
    serve = subprocess.Popen([*HILUM, "serve"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None and "Hilum is listening" in serve.stdout.readline()
        sent = subprocess.run(
            [DCMTK_STORESCU, "-aec", "HILUM", "127.0.0.1", str(settings.dimse.port),
             *map(str, files)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
    finally:
        serve.send_signal(signal.SIGKILL)
        serve.wait(30)
    receiver.up()
    events = subprocess.Popen([*HILUM, "events"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert events.stdout is not None and "delivering to 1" in events.stdout.readline()
        wait_until(lambda: len(set(receiver.accepted_ids)) == 6, "six events", timeout_s=60)
    finally:
        events.send_signal(signal.SIGTERM)
        assert events.wait(30) == 0
    archive = open_archive(settings)
    try:
        assert sorted(set(receiver.accepted_ids)) == [e.id for e in changes(archive)]
    finally:
        archive.close()
    assert {body["data"]["SOPInstanceUID"] for body in receiver.accepted} == {
        pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in files
    }


@pytest.mark.parametrize("backend", ["postgresql-s3"])
def test_two_delivery_loops_share_a_webhook_without_overlapping(
    settings: Settings, archive: Archive, receiver: Receiver, tmp_path: Path
) -> None:
    """Scale-out: two loops (two connection pools, as two `hilum events` processes) on one
    index; the webhook's lease lets one deliver at a time: no request overlaps another, and
    the events arrive in order, each once (nothing failed, so nothing is repeated)."""
    settings = webhook_settings(tmp_path, receiver).model_copy(update={"storage": settings.storage})
    other = open_archive(settings)
    receiver.up()
    stop = threading.Event()
    loops = [
        DeliveryLoop(settings, a, subscribers_from_settings(settings, a)) for a in (archive, other)
    ]
    threads = [threading.Thread(target=loop.run, args=(stop,)) for loop in loops]
    for thread in threads:
        thread.start()
    try:
        store(archive, tmp_path / "a", 12)
        store(other, tmp_path / "b", 12)
        every = [event.id for event in changes(archive, 0, 100)]
        wait_until(lambda: receiver.accepted_ids == every, "every event, in order", timeout_s=60)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        other.close()
    assert receiver.most_in_flight == 1
