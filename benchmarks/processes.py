"""Processes and loopback ports for the benchmarks: start a server, wait until it answers,
stop its whole process group."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


_taken_ports: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(also_free_at: int = 0) -> int:
    """A free loopback port below 55000 (with ``port + also_free_at`` free too)."""
    for _ in range(1000):
        port = random.randint(20000, 44999)
        candidates = {port, port + also_free_at}
        if candidates & _taken_ports or not all(_bindable(p) for p in candidates):
            continue
        _taken_ports.update(candidates)
        return port
    raise RuntimeError("no free loopback port found")


def start_process(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(part) for part in command],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group, killed as a whole
        )


def stop_process(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            progress(f"pid {process.pid} did not stop on {sig.name}")


def log_tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_until(
    ready: Callable[[], bool], process: subprocess.Popen, log: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{log.name}: exited with {process.returncode}\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{log.name}: not ready after {timeout_s:.0f} s\n{log_tail(log)}")
        time.sleep(0.1)


def accepts_tcp(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    return ready


def printed(log: Path, text: str) -> Callable[[], bool]:
    """Ready once the process wrote ``text`` to its log (``hilum serve``: "Hilum is listening",
    after its AI worker loaded the models; its DIMSE port accepts connections before that)."""

    def ready() -> bool:
        return log.is_file() and text in log.read_text(errors="replace")

    return ready


def answers_http(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            urllib.request.urlopen(url, timeout=2).close()
        except urllib.error.HTTPError:
            return True  # any HTTP answer, 403 included, means the server is up
        except OSError:
            return False
        return True

    return ready


@contextlib.contextmanager
def running(
    command: list[str],
    log: Path,
    ready: Callable[[], bool],
    env: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> Iterator[subprocess.Popen]:
    process = start_process(command, log, env)
    try:
        wait_until(ready, process, log, timeout_s)
        yield process
    finally:
        stop_process(process)
