"""The request deadlines' rules (server/request_deadlines.py), on an injected clock: which
phase a request is in, when it is cut and how, and the per-address share. The servers' own use
of them is tests/server/test_hostile_http.py's."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from server.request_deadlines import RequestDeadlines, RequestLimits

LIMITS = RequestLimits(
    header_timeout_s=10, header_reads_per_client=2, body_timeout_s=60, body_min_bytes_per_s=1024,
    send_timeout_s=30,
)  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Cut:
    """A connection's shutdown, as the watchdog calls it."""

    def __init__(self) -> None:
        self.how: list[int] = []
        self.done = threading.Event()

    def __call__(self, how: int) -> None:
        self.how.append(how)
        self.done.set()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def deadlines(clock: Clock) -> Iterator[RequestDeadlines]:
    watched = RequestDeadlines(LIMITS, clock)
    watched.start()
    yield watched
    watched.stop()


def _after(deadlines: RequestDeadlines, clock: Clock, seconds: float, cut: Cut) -> bool:
    """Move the clock on; whether the watchdog cuts within a few of its ticks."""
    clock.now += seconds
    return cut.done.wait(2)


def test_headers_are_cut_at_their_total_deadline(deadlines: RequestDeadlines, clock: Clock) -> None:
    cut = Cut()
    assert deadlines.begin(cut, "10.0.0.1")
    assert not _after(deadlines, clock, 9, cut)
    assert _after(deadlines, clock, 2, cut)
    assert cut.how == [socket.SHUT_RD]
    deadlines.end()


def test_a_body_has_its_timeout_plus_a_second_per_minimum_rate(
    deadlines: RequestDeadlines, clock: Clock
) -> None:
    cut = Cut()
    deadlines.begin(cut, "10.0.0.1")
    clock.now += 5
    deadlines.body_begins()  # the header deadline no longer applies
    for _ in range(30):
        deadlines.body_read(1024)  # 30 KiB: 30 s more
    assert not _after(deadlines, clock, 89, cut)
    assert _after(deadlines, clock, 2, cut)
    assert cut.how == [socket.SHUT_RD]


def test_a_response_piece_nobody_takes_is_cut_both_ways(
    deadlines: RequestDeadlines, clock: Clock
) -> None:
    cut = Cut()
    deadlines.begin(cut, "10.0.0.1")
    deadlines.body_begins()
    deadlines.sending()
    clock.now += 25
    deadlines.sending()  # the client took a piece
    assert not _after(deadlines, clock, 29, cut)
    assert _after(deadlines, clock, 2, cut)
    assert cut.how == [socket.SHUT_RDWR]


def _in_thread(action: Callable[[], object]) -> object:
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(action()))
    thread.start()
    thread.join(5)
    return result[0]


def test_an_address_has_its_share_of_header_reads(deadlines: RequestDeadlines) -> None:
    # Each request is its serving thread's; two of one address read headers, a third waits.
    assert _in_thread(lambda: deadlines.begin(Cut(), "10.0.0.1"))
    assert deadlines.begin(Cut(), "10.0.0.1")
    assert not _in_thread(lambda: deadlines.begin(Cut(), "10.0.0.1"))
    assert _in_thread(lambda: deadlines.begin(Cut(), "10.0.0.2"))  # another address
    assert _in_thread(lambda: deadlines.begin(Cut(), "10.0.0.3", counted=False))
    deadlines.body_begins()  # this thread's request is past its headers: a place is free
    assert _in_thread(lambda: deadlines.begin(Cut(), "10.0.0.1"))


def test_a_request_over_the_share_gets_a_slot_freed_while_it_waits(
    deadlines: RequestDeadlines,
) -> None:
    """A browser's parallel requests: the one over the share waits (up to 2 s) for another of
    its address to finish its headers, instead of a 503."""
    assert _in_thread(lambda: deadlines.begin(Cut(), "10.0.0.1"))
    assert deadlines.begin(Cut(), "10.0.0.1")
    result: list[bool] = []
    waiting = threading.Thread(target=lambda: result.append(deadlines.begin(Cut(), "10.0.0.1")))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive() and result == []  # waiting for a slot
    deadlines.body_begins()  # this thread's request is past its headers
    waiting.join(5)
    assert result == [True]
