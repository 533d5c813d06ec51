"""The decoder processes (issue 17): real spawned processes, real limits. A decode that passes
``decode_memory_mb`` or ``decode_timeout_s``, or kills its process, fails that call with the
limit named, in bounded time, and the next call gets a fresh process."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from storage.decoder_pool import DecoderPool
from storage.errors import DecodeFailed, DecodersBusy, StorageUnavailable
from tests import decoder_jobs


@pytest.fixture
def pool() -> Iterator[DecoderPool]:
    pool = DecoderPool(processes=1, memory_mb=64, timeout_s=2.0)
    try:
        yield pool
    finally:
        pool.close()


def test_a_decode_runs_in_another_process_which_serves_the_next(pool: DecoderPool) -> None:
    first = pool.run(os.getpid)
    assert first != os.getpid()
    assert pool.run(os.getpid) == first
    assert pool.run(decoder_jobs.allocate, 16) == 16 << 20  # within the budget


def test_over_the_memory_budget_fails_that_decode_and_a_fresh_process_serves_the_next(
    pool: DecoderPool,
) -> None:
    before = pool.run(os.getpid)
    started = time.monotonic()
    with pytest.raises(DecodeFailed, match=r"limits\.decode_memory_mb \(64 MiB\)") as failed:
        pool.run(decoder_jobs.allocate, 256)
    assert failed.value.limit == "decode_memory_mb"
    assert time.monotonic() - started < 30
    after = pool.run(os.getpid)
    assert after != before
    assert pool.run(decoder_jobs.allocate, 16) == 16 << 20


def test_over_the_deadline_is_stopped_and_a_fresh_process_serves_the_next(
    pool: DecoderPool,
) -> None:
    before = pool.run(os.getpid)  # started: the deadline counts the decode, not the start
    started = time.monotonic()
    with pytest.raises(DecodeFailed, match=r"limits\.decode_timeout_s \(2 s\)") as failed:
        pool.run(decoder_jobs.sleep, 600)
    elapsed = time.monotonic() - started
    assert failed.value.limit == "decode_timeout_s"
    assert 2 <= elapsed < 30
    with pytest.raises(ProcessLookupError):
        os.kill(before, 0)  # stopped and reaped
    assert pool.run(os.getpid) != before


def test_a_decoder_that_dies_fails_its_decode_with_the_signal(pool: DecoderPool) -> None:
    with pytest.raises(DecodeFailed, match="ended \\(signal SIGABRT\\)"):
        pool.run(decoder_jobs.abort)
    assert pool.run(decoder_jobs.sleep, 0) == 0


def test_a_decoder_error_is_the_reason_and_the_process_is_kept(pool: DecoderPool) -> None:
    before = pool.run(os.getpid)
    with pytest.raises(DecodeFailed, match="^the codestream ends early$") as failed:
        pool.run(decoder_jobs.fail, "the codestream ends early")
    assert failed.value.limit is None
    assert pool.run(os.getpid) == before


def test_callers_wait_for_a_free_decoder_at_most_the_deadline(pool: DecoderPool) -> None:
    """One decoder, three callers of a decode that never ends: each is answered within about
    two deadlines (the first stopped, the others stopped too or told the decoders are busy)."""
    pool.run(os.getpid)
    outcomes: list[BaseException] = []
    elapsed: list[float] = []

    def call() -> None:
        started = time.monotonic()
        try:
            pool.run(decoder_jobs.sleep, 600)
        except (DecodeFailed, DecodersBusy) as error:
            outcomes.append(error)
        elapsed.append(time.monotonic() - started)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(outcomes) == 3
    assert any(isinstance(error, DecodersBusy) for error in outcomes)
    assert all(isinstance(error, DecodeFailed | StorageUnavailable) for error in outcomes)
    assert max(elapsed) < 60
    assert pool.run(decoder_jobs.sleep, 0) == 0


def test_close_ends_the_idle_decoders(pool: DecoderPool) -> None:
    pid = pool.run(os.getpid)
    pool.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert pool.run(os.getpid) != pid  # a later decode starts another


def test_no_decoder_processes_decodes_in_the_calling_process() -> None:
    pool = DecoderPool(processes=0, memory_mb=64, timeout_s=2.0)
    assert pool.run(os.getpid) == os.getpid()
    with pytest.raises(DecodeFailed, match="early"):
        pool.run(decoder_jobs.fail, "early")
