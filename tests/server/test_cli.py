"""The ``hilum`` command as an administrator runs it: a real process, real peers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from config import Settings
from server.dimse.ae import DimseServer
from storage.archive import open_archive
from storage.audit import AuditEvent, AuditSearch, search_records
from tests.factories import DCMTK_STORESCU, ct_instance, write_part10
from tests.waiting import wait_until

HILUM = [sys.executable, "-m", "server.cli"]


def hilum_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a ``hilum`` process on ``settings`` (``extra``: more variables); no
    PROMETHEUS_MULTIPROC_DIR of the test run's own."""
    s = settings.storage
    return {
        **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        "HILUM_SERVER__DATA_DIR": str(settings.server.data_dir),
        "HILUM_DIMSE__PORT": str(settings.dimse.port),
        "HILUM_HTTP__PORT": str(settings.http.port),
        "HILUM_STORAGE__DATABASE_URL": s.database_url,
        "HILUM_STORAGE__BLOB_URL": s.blob_url,
        "HILUM_STORAGE__S3_ACCESS_KEY": s.s3_access_key,
        "HILUM_STORAGE__S3_SECRET_KEY": s.s3_secret_key,
        **extra,
    }


def _hilum(settings: Settings, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HILUM, *args],
        env=hilum_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def _series(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    return [
        write_part10(ct_instance(study, series, seed=i), folder / f"{i}.dcm") for i in range(count)
    ]


def test_serve_receives_a_study_and_stops_cleanly(settings: Settings, tmp_path: Path) -> None:
    files = _series(tmp_path / "study", 5)
    server = subprocess.Popen(
        [*HILUM, "serve"], env=hilum_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert "Hilum is listening" in banner, server.stderr.read() if server.stderr else ""
        assert ":pw@" not in banner
        port = str(settings.dimse.port)
        sent = subprocess.run(
            [DCMTK_STORESCU, "-aec", "HILUM", "127.0.0.1", port, *map(str, files)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0

    verified = _hilum(settings, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "5 instances checked: 0 missing blobs, 0 checksum mismatches, 0 orphan blobs" in (
        verified.stdout
    )


def test_import_summarises_and_fails_on_bad_files(settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "archive"
    files = _series(folder / "nested" / "deeper", 6)
    (folder / "copy.dcm").write_bytes(files[0].read_bytes())  # an identical duplicate
    (folder / "notes.txt").write_text("not DICOM")

    result = _hilum(settings, "import", str(folder))

    assert result.returncode == 1
    assert "6 stored, 1 duplicate, 1 failed" in result.stdout
    assert "notes.txt: not a DICOM Part 10 file" in result.stdout
    assert "file/s" in result.stderr  # the progress bar

    again = _hilum(settings, "import", str(folder / "nested"))
    assert again.returncode == 0 and "0 stored, 6 duplicate, 0 failed" in again.stdout


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_verify_reports_missing_orphan_and_corrupt_blobs(
    backend: str, settings: Settings, tmp_path: Path
) -> None:
    _series(tmp_path / "archive", 3)
    assert _hilum(settings, "import", str(tmp_path / "archive")).returncode == 0
    blobs = sorted((settings.server.data_dir / "blobs").rglob("*.dcm"))
    blobs[0].unlink()  # missing
    blobs[1].write_bytes(blobs[1].read_bytes()[:-1] + b"\x01")  # bit rot
    (blobs[2].parent / "stray.dcm").write_bytes(b"x")  # orphan

    result = _hilum(settings, "verify")

    assert result.returncode == 1
    assert "3 instances checked: 1 missing blobs, 1 checksum mismatches, 1 orphan blobs" in (
        result.stdout
    )
    assert "stray.dcm" in result.stdout


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_verify_repair_removes_old_orphans_and_records_it(
    backend: str, settings: Settings, tmp_path: Path
) -> None:
    _series(tmp_path / "archive", 2)
    assert _hilum(settings, "import", str(tmp_path / "archive")).returncode == 0
    blobs = sorted((settings.server.data_dir / "blobs").rglob("*.dcm"))
    orphan = blobs[0].with_name("0" * 64 + ".0000000000000000.dcm")  # a blob never committed
    orphan.write_bytes(blobs[0].read_bytes())
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))
    young = blobs[0].with_name("1" * 64 + ".0000000000000000.dcm")
    young.write_bytes(b"being stored now")

    result = _hilum(settings, "verify", "--repair")  # default grace: an hour

    assert result.returncode == 1, result.stdout  # the young one is still an orphan
    assert (
        "2 instances checked: 0 missing blobs, 0 checksum mismatches, 1 orphan blobs, "
        "1 orphan blobs removed" in result.stdout
    )
    assert not orphan.exists() and young.exists()
    # Recorded as the janitor records it: which blob, by Hilum itself.
    archive = open_archive(settings)
    try:
        (record,) = [
            r for r in search_records(archive.index, AuditSearch())
            if r["event"] == AuditEvent.ORPHANS_REMOVED
        ]  # fmt: skip
    finally:
        archive.close()
    assert record["action"] == "D" and record["instances"] == 1
    assert orphan.name in record["detail"]
    young.unlink()
    assert _hilum(settings, "verify").returncode == 0


@pytest.mark.parametrize("command", ["serve", "worker"])
@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_the_long_running_processes_sweep_orphans(
    backend: str, command: str, settings: Settings, tmp_path: Path
) -> None:
    """hilum serve and hilum worker own the orphan janitor (storage/janitor.py)."""
    assert _hilum(settings, "import", *map(str, _series(tmp_path / "a", 1))).returncode == 0
    (blob,) = (settings.server.data_dir / "blobs").rglob("*.dcm")
    orphan = blob.with_name("0" * 64 + ".0000000000000000.dcm")  # written, never committed
    orphan.write_bytes(blob.read_bytes())
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))
    env = hilum_env(
        settings,
        HILUM_STORAGE__ORPHAN_SWEEP_INTERVAL_S="0.5",
        HILUM_INFERENCE__SERVE_WORKER="false",
    )
    process = subprocess.Popen(
        [*HILUM, command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: not orphan.exists(), f"hilum {command}'s janitor", 120)
        assert blob.exists()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    assert "orphan janitor: removed 1 orphan blobs" in (
        process.stderr.read() if process.stderr else ""
    )
    assert _hilum(settings, "verify").returncode == 0


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_dimse_refuses_an_index_that_was_not_upgraded(backend: str, settings: Settings) -> None:
    result = _hilum(settings, "dimse")
    assert result.returncode == 3
    assert "run `hilum db upgrade` first" in result.stderr
    upgraded = _hilum(settings, "db", "upgrade")
    assert upgraded.returncode == 0 and "newest schema" in upgraded.stdout


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_configuration_error_is_reported_with_the_key(
    backend: str, tmp_path: Path, settings: Settings
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[dimse]\nprot = 104\n")
    result = _hilum(settings, "--config", str(config), "db", "upgrade")
    assert result.returncode == 2
    assert "prot" in result.stderr and "configuration error" in result.stderr


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_dimse_processes_share_the_port(backend: str, settings: Settings, tmp_path: Path) -> None:
    """``[dimse] processes = 3``: two more receiving processes on the same port (SO_REUSEPORT);
    parallel associations are all stored; they stop with their parent, even a killed one."""
    files = _series(tmp_path / "study", 12)
    env = {**hilum_env(settings), "HILUM_DIMSE__PROCESSES": "3"}
    subprocess.run([*HILUM, "db", "upgrade"], env=env, check=True, timeout=120)
    server = subprocess.Popen(
        [*HILUM, "dimse"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    receivers: list[int] = []
    try:
        assert server.stdout is not None
        assert "Hilum is listening" in server.stdout.readline()
        receivers = _children(server.pid)
        assert len(receivers) == 2
        port = str(settings.dimse.port)
        senders = [
            subprocess.Popen(
                [DCMTK_STORESCU, "-aec", "HILUM", "127.0.0.1", port, *map(str, files[n::6])],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for n in range(6)
        ]
        assert [sender.wait(120) for sender in senders] == [0] * 6
    finally:
        server.kill()  # no chance to stop its receivers: they see their input end
        server.wait(30)
    for pid in receivers:
        wait_until(lambda pid=pid: _state(pid) == "Z", f"receiver {pid} to stop", 30)
    verified = _hilum(settings, "verify")
    assert "12 instances checked: 0 missing blobs" in verified.stdout, verified.stdout


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (FileNotFoundError, IndexError):
        return "Z"


@pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)  # no storage involved
def test_echo_is_the_health_check_of_the_dimse_scp(
    settings: Settings, dimse_server: DimseServer
) -> None:
    answered = _hilum(settings, "echo", "--timeout", "5")
    assert answered.returncode == 0, answered.stderr
    assert f"C-ECHO to HILUM@127.0.0.1:{dimse_server.port}: success" in answered.stdout

    dimse_server.stop()
    refused = _hilum(settings, "echo", "--timeout", "5")
    assert refused.returncode == 1
    assert "failed: no association" in refused.stderr
