"""Waiting in tests: poll a condition with a deadline, never a fixed sleep (CONVENTIONS 12)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(
    condition: Callable[[], Any], what: str, timeout_s: float = 300, interval_s: float = 0.1
) -> Any:
    """Poll ``condition`` until it returns something true, and return that; fail the test,
    naming ``what``, once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)
