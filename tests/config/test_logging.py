"""JSON logs (``[log] format = "json"``): the formatter and its context fields, then a real
``hilum serve`` whose every stderr line must parse as JSON and name its request or association.
``hilum dimse``, ``hilum web`` (gunicorn, its access log included) and ``hilum worker`` are
checked the same way in tests/test_scale_out.py, which runs them all."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from config import Settings
from config.logging import JsonFormatter, log_context
from server.app import request_id_for
from tests.factories import ct_instance
from tests.server.test_cli import hilum_env
from tests.waiting import wait_until


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of the test's own whose lines are JSON, into a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("dimse"))
    logger = logging.getLogger("tests.config.json_log")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_json_line_carries_the_fields_of_the_blocks_around_it(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_log
    logger.info("before")
    with log_context(peer="10.0.0.7:4100"):
        logger.info("connected")
        with log_context(association="A3"):
            logger.warning("stored %d of %d", 2, 3)
            try:
                raise ZeroDivisionError("bad\nline")
            except ZeroDivisionError:
                logger.exception("failed")
        # Another thread has its own context: nothing of this connection's.
        other = threading.Thread(target=logger.info, args=("elsewhere",))
        other.start()
        other.join()
    logger.info("after")

    lines = _lines(stream.getvalue())
    assert [line["message"] for line in lines] == [
        "before", "connected", "stored 2 of 3", "failed", "elsewhere", "after"
    ]  # fmt: skip
    assert all(line["command"] == "dimse" and isinstance(line["pid"], int) for line in lines)
    assert all(line["logger"] == "tests.config.json_log" for line in lines)
    assert [(line.get("peer"), line.get("association")) for line in lines] == [
        (None, None), ("10.0.0.7:4100", None), ("10.0.0.7:4100", "A3"), ("10.0.0.7:4100", "A3"),
        (None, None), (None, None),
    ]  # fmt: skip
    assert lines[2]["level"] == "WARNING" and lines[3]["level"] == "ERROR"
    assert "ZeroDivisionError: bad\nline" in lines[3]["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", lines[0]["time"])


def test_gunicorns_access_line_takes_its_request_id_from_the_response_header() -> None:
    # gunicorn logs each request with its atoms as the one mapping argument; response
    # headers are "{name}o", lower-cased.
    atoms = {"h": "10.0.0.9", "s": "200", "{x-request-id}o": "req-77"}
    record = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, '%(h)s %(s)s',
                               (atoms,), None)  # fmt: skip
    line = json.loads(JsonFormatter("web").format(record))
    assert (line["message"], line["request_id"], line["command"]) == (
        "10.0.0.9 200",
        "req-77",
        "web",
    )


def test_a_request_id_is_the_clients_only_when_it_is_a_short_token() -> None:
    assert request_id_for("3f2a-77:b") == "3f2a-77:b"
    for unusable in (None, "", "x" * 65, "two words", 'quote"d', "new\nline"):
        generated = request_id_for(unusable)
        assert re.fullmatch(r"[0-9a-f]{12}", generated), unusable


@pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)
def test_hilum_serve_logs_only_json_lines_each_naming_its_request_or_association(
    settings: Settings, tmp_path: Path
) -> None:
    env = hilum_env(settings, HILUM_LOG__FORMAT="json", HILUM_INFERENCE__SERVE_WORKER="false")
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env,
                                   stdout=stdout, stderr=stderr, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{settings.http.port}"
    try:

        def started() -> bool:
            if process.poll() is not None:
                pytest.fail(f"hilum serve exited: {err.read_text()[-3000:]}")
            return out.read_text().startswith("Hilum is listening")

        wait_until(started, "hilum serve to start", timeout_s=120)
        # DIMSE: an association that echoes and stores one instance.
        ae = AE(ae_title="LOGGING_SCU")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", settings.dimse.port, ae_title=settings.dimse.ae_title)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(ct_instance()).Status == 0
        assoc.release()
        # HTTP: a request id of the client's, one that is refused, and a request that logs.
        healthz = requests.get(f"{base}/healthz", headers={"X-Request-Id": "probe-42"}, timeout=10)
        assert healthz.headers["X-Request-Id"] == "probe-42"
        long_id = requests.get(f"{base}/healthz", headers={"X-Request-Id": "x" * 100}, timeout=10)
        generated = long_id.headers["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{12}", generated)
        blobs = settings.server.data_dir / "blobs"
        shutil.move(blobs, settings.server.data_dir / "blobs-away")
        ready = requests.get(f"{base}/readyz", headers={"X-Request-Id": "probe-ready"}, timeout=10)
        assert ready.status_code == 503
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    assert process.returncode == 0, err.read_text()[-3000:]

    lines = _lines(err.read_text())  # every line of stderr is one JSON object
    assert lines and all(line["command"] == "serve" for line in lines)
    assert {line["pid"] for line in lines} == {process.pid}

    def about(request_id: str) -> list[str]:
        return [line["message"] for line in lines if line.get("request_id") == request_id]

    (access,) = about("probe-42")
    assert '"GET /healthz" 200' in access
    assert any('"GET /healthz" 200' in message for message in about(generated))
    not_ready = about("probe-ready")
    assert any(message.startswith("not ready: blobs: blob directory") for message in not_ready)
    assert any('"GET /readyz" 503' in message for message in not_ready)

    associations = [line for line in lines if "association" in line]
    (ended,) = [line for line in associations if "association LOGGING_SCU ->" in line["message"]]
    assert ended["message"].startswith(f"[{ended['association']}] ")
    assert "1 stored, 0 refused" in ended["message"]
    assert ended["peer"].startswith("127.0.0.1:")
    # Every line written about an association names it.
    for line in lines:
        named = re.match(r"\[(A\d+)\] ", line["message"])
        if named:
            assert line.get("association") == named.group(1), line
