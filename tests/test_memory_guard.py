"""The memory guard of the hostile-input tests (tests/hilum_process.py) fails a test whose
server grew past its budget, and passes one that stayed within it: a real process, its VmHWM."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.hilum_process import MemoryGuard

# Allocates (and touches) the MiB given on each line of its input, then says "done".
_ALLOCATOR = """
import sys
held = []
for line in sys.stdin:
    held.append(bytearray(int(line) << 20))
    print("done", flush=True)
"""


def test_the_guard_fails_past_its_budget_and_passes_within_it() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _ALLOCATOR], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        guard = MemoryGuard(process.pid, budget_bytes=48 << 20)
        process.stdin.write("16\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "done"
        guard.check()  # 16 MiB: within

        process.stdin.write("64\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "done"
        with pytest.raises(AssertionError, match="past its budget of 48 MiB"):
            guard.check()
        assert guard.grown() >= 80 << 20
    finally:
        process.kill()
        process.wait(10)
