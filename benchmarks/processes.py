"""Processes and loopback ports for the benchmarks: start a server, wait until it answers,
stop its whole process group; read a running server's CPU time and peak memory from /proc."""

from __future__ import annotations

import contextlib
import os
import random
import select
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


# DCMTK (Debian's 3.6.7, also inside Orthanc) leaves Nagle's algorithm on unless TCP_NODELAY is
# set in its environment; each DIMSE message then waits ~40 ms for the peer's delayed ACK.
DCMTK_NODELAY: dict[str, str | None] = {"TCP_NODELAY": "1"}
# The shipped configuration, Nagle on: TCP_NODELAY removed even if this shell sets it.
DCMTK_NAGLE: dict[str, str | None] = {"TCP_NODELAY": None}


def environment(env: dict[str, str | None] | None) -> dict[str, str]:
    """This process's environment with ``env`` applied; a None value removes the variable."""
    merged = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


def start_process(
    command: list[str], log: Path, env: dict[str, str | None] | None = None
) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(part) for part in command],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment(env),
            start_new_session=True,  # its own process group, killed as a whole
        )


def wait_exited(process: subprocess.Popen, timeout_s: float) -> int:
    """``process.wait(timeout=timeout_s)``, returning as soon as the process exits (Linux: a
    pidfd). ``Popen.wait`` with a timeout polls, sleeping up to 50 ms between looks, so a timed
    client that ran 0.2 s was read as having run up to 50 ms longer (a C-MOVE of 300 instances
    in 0.22 s or in 0.26 s both read as 0.26 s, 1 130 instances/s)."""
    pidfd = os.pidfd_open(process.pid)
    try:
        if not select.select([pidfd], [], [], timeout_s)[0]:
            raise subprocess.TimeoutExpired(process.args, timeout_s)
    finally:
        os.close(pidfd)
    return process.wait()


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
    env: dict[str, str | None] | None = None,
    timeout_s: float = 60.0,
) -> Iterator[subprocess.Popen]:
    process = start_process(command, log, env)
    try:
        wait_until(ready, process, log, timeout_s)
        yield process
    finally:
        stop_process(process)


# --- /proc (proc(5)); psutil is not a dependency ------------------------------------------

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def stat_fields(stat: str) -> list[str]:
    """The fields of a /proc/<pid>/stat line after ``comm``, which may hold spaces and ")":
    index 0 is field 3 (state), 1 is ppid, 11 utime, 12 stime, 13 cutime, 14 cstime."""
    return stat[stat.rindex(")") + 2 :].split()


def _all_stats() -> dict[int, list[str]]:
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # a process that exited meanwhile
                stats[int(entry.name)] = stat_fields(Path(entry.path, "stat").read_text())
    return stats


def process_tree(pid: int) -> dict[int, list[str]]:
    """``pid`` and its living descendants: pid -> stat fields."""
    stats = _all_stats()
    tree = {pid: stats[pid]} if pid in stats else {}
    grew = True
    while grew:
        children = {
            child: fields
            for child, fields in stats.items()
            if child not in tree and int(fields[1]) in tree
        }
        tree.update(children)
        grew = bool(children)
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid``, its threads and its descendants: those alive (utime,
    stime) and those that exited and were waited for (cutime, cstime). Resolution: one clock
    tick (10 ms)."""
    ticks = sum(sum(int(value) for value in fields[11:15]) for fields in process_tree(pid).values())
    return ticks / CLOCK_TICKS_PER_S


def peak_rss_bytes(pid: int) -> int:
    """The peak resident set size (VmHWM) of ``pid`` plus those of its living descendants."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024  # kB
    return total
