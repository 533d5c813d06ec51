"""A real ``hilum serve`` or ``hilum web`` process for a test, on the test's index and blob
store, and its memory guard: the peak resident set size (VmHWM, ``/proc/PID/status``) of the
process and its children (gunicorn's workers), which a hostile-input test must keep within a
budget (issue 17)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests

from benchmarks.processes import peak_rss_bytes
from config import Settings
from tests.conftest import free_port
from tests.server.test_cli import HILUM, hilum_env


@dataclass
class MemoryGuard:
    """Fails the test when the process tree's peak RSS grew past ``budget_bytes`` since the
    guard was made (after start-up: what serving the test's requests cost)."""

    pid: int
    budget_bytes: int
    baseline: int = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Count from now: after a warm-up request has loaded what a route imports."""
        self.baseline = peak_rss_bytes(self.pid)

    def grown(self) -> int:
        return peak_rss_bytes(self.pid) - self.baseline

    def check(self) -> None:
        grown = self.grown()
        assert grown <= self.budget_bytes, (
            f"the server's peak RSS (VmHWM) grew by {grown >> 20} MiB, past its budget of "
            f"{self.budget_bytes >> 20} MiB"
        )


@dataclass
class RunningHilum:
    command: str
    process: subprocess.Popen[str]
    port: int
    memory: MemoryGuard

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicomweb"


@contextlib.contextmanager
def running_hilum(
    command: str, settings: Settings, *, memory_budget_bytes: int = 256 << 20, **env: str
) -> Iterator[RunningHilum]:
    """``hilum COMMAND`` (serve or web) until the block ends, then stopped with SIGTERM; it
    must exit 0. ``env``: more ``HILUM_*`` variables."""
    port = free_port()
    variables = {
        "HILUM_HTTP__PORT": str(port),
        "HILUM_HTTP__WORKERS": "2",
        "HILUM_HTTP__THREADS": "2",
        "HILUM_INFERENCE__SERVE_WORKER": "false",
        **env,
    }
    process = subprocess.Popen(
        [*HILUM, command], env=hilum_env(settings, **variables),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        if "Hilum is listening" not in banner:
            process.kill()
            pytest.fail(f"hilum {command} did not start: {process.communicate()[1][-3000:]}")
        assert f"http://127.0.0.1:{port}/dicomweb" in banner
        # One query first: what the first request loads (gunicorn's workers import lazily)
        # is start-up, not what the test's requests cost.
        requests.get(f"http://127.0.0.1:{port}/dicomweb/studies", timeout=60)
        yield RunningHilum(command, process, port, MemoryGuard(process.pid, memory_budget_bytes))
    finally:
        stop_hilum(process)
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""


def stop_hilum(process: subprocess.Popen[str]) -> None:
    """Stop a ``hilum`` process as its service manager would (SIGTERM), unless it ended
    already; one that is still there after 30 s is killed and fails the test."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
