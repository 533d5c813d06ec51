"""The /proc, environment and waiting helpers of the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.processes import environment, stat_fields, wait_exited

# proc(5): pid (comm) state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt
# utime stime cutime cstime ...; a comm may hold spaces and parentheses.
STAT = "4242 (we) ird (name)) S 17 4242 4242 0 -1 4194560 10 0 0 0 123 45 6 7 20 0 3 0"


def test_stat_fields_after_a_comm_with_spaces_and_parentheses() -> None:
    fields = stat_fields(STAT)
    assert fields[0] == "S"
    assert int(fields[1]) == 17  # ppid
    assert [int(value) for value in fields[11:15]] == [123, 45, 6, 7]


def test_environment_sets_and_removes_variables(monkeypatch) -> None:
    monkeypatch.setenv("TCP_NODELAY", "1")
    monkeypatch.setenv("HILUM_BENCH_KEPT", "yes")
    assert "TCP_NODELAY" not in environment({"TCP_NODELAY": None})
    assert environment({"TCP_NODELAY": None})["HILUM_BENCH_KEPT"] == "yes"
    assert environment({"TCP_NODELAY": "0"})["TCP_NODELAY"] == "0"
    assert environment(None) == dict(os.environ)


def test_wait_exited_gives_the_exit_status_or_times_out() -> None:
    exiting = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert wait_exited(exiting, 60) == 3
    waiting = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            wait_exited(waiting, 0.01)
    finally:
        assert waiting.stdin is not None
        waiting.stdin.close()  # input() gets EOF: it exits
        waiting.wait()
