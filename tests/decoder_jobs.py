"""Jobs for a decoder process in tests (:mod:`storage.decoder_pool`): importable by the spawned
process, and light (stdlib only), since it is imported there after the memory limit is set."""

from __future__ import annotations

import os
import time


def allocate(mebibytes: int) -> int:
    """Touch ``mebibytes`` of memory."""
    return len(bytearray(mebibytes << 20))


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def abort() -> None:
    """Die as a native decoder does on a failed allocation (Rust, C++): SIGABRT."""
    os.abort()


def fail(message: str) -> None:
    raise ValueError(message)
