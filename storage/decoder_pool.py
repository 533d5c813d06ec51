"""The bounded place where pixel data is decoded (issue 17): a few decoder processes, each under
an address-space limit (``[limits] decode_memory_mb``) and a wall-clock deadline
(``decode_timeout_s``), replaced by a fresh one when it dies or is stopped.

pydicom's decoders (pylibjpeg, openjpeg, RLE) allocate what a codestream declares and run as
long as it takes. In the server's own process one hostile frame would take the memory and the
CPU that every other request needs; here it takes one decoder process, which fails that one
request (:class:`DecodeFailed`, with the limit it passed) and is replaced. Everything that
decodes, renders or transcodes pixel data runs its work here: the functions of
:mod:`storage.pixel_decoding`, sent with their arguments (plain values) and answered with their
results.

The processes are started with ``spawn`` (a fresh interpreter, never a fork of a process that
holds database pools, S3 clients and threads), when first needed, and each imports
:mod:`storage.pixel_decoding` (numpy, pydicom, Pillow) before its limit is set, so that the
budget is what a decode may use on top of the decoder's own interpreter. A decoder that ran
out of memory is replaced too (a fresh heap). ``decoder_processes = 0`` decodes in the calling
process, without either limit (for a comparison in a benchmark; not for a server).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import multiprocessing
import os
import resource
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from config.settings import LimitsSettings
from storage.errors import DecodeFailed, DecodersBusy

log = logging.getLogger(__name__)

T = TypeVar("T")
# What a decoder imports before its limit is set: the module every decode job lives in.
PRELOADED = ("storage.pixel_decoding",)
# A decoder's interpreter starts (imports numpy, pydicom, Pillow) within this, or the decode
# is refused as unavailable; it is not counted in decode_timeout_s.
START_TIMEOUT_S = 120.0
_SPAWN = multiprocessing.get_context("spawn")


# A pipe holds 64 KiB by default: a frame of 512 KiB would cross it in eight writes, each
# waiting for the other process to be scheduled. Linux lets a process raise it to 1 MiB
# (/proc/sys/fs/pipe-max-size) without privileges; where it cannot, the default stays.
_PIPE_BYTES = 1 << 20


@dataclass
class _Decoder:
    process: BaseProcess
    requests: Connection  # ours: write
    replies: Connection  # ours: read

    def close(self) -> None:
        self.requests.close()
        self.replies.close()


class DecoderPool:
    """Up to ``processes`` decoder processes shared by every thread of the process that owns
    the pool; a caller waits up to ``timeout_s`` for a free one (then :class:`DecodersBusy`)."""

    def __init__(self, processes: int, memory_mb: int, timeout_s: float) -> None:
        self.processes = processes
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self._reset()

    @classmethod
    def from_limits(cls, limits: LimitsSettings) -> DecoderPool:
        return cls(limits.decoder_processes, limits.decode_memory_mb, limits.decode_timeout_s)

    def _reset(self) -> None:
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._idle: list[_Decoder] = []
        self._free = threading.BoundedSemaphore(max(1, self.processes))

    def run(self, function: Callable[..., T], *args: Any, in_process: bool = False) -> T:
        """``function(*args)`` in a decoder process; ``function`` is a module-level function of
        :mod:`storage.pixel_decoding`, the arguments and the result plain values. Raises
        :class:`DecodeFailed` when it raised, passed a limit, or its process died.

        ``in_process``: the caller knows that the work runs no codec and is small
        (:func:`storage.pixel_decoding.is_small_native`); it runs here, with the same errors."""
        if self.processes == 0 or in_process:
            return _in_process(function, args)
        if os.getpid() != self._owner:  # a fork of the owner: its decoders are not this one's
            self._reset()
        if not self._free.acquire(timeout=self.timeout_s):
            raise DecodersBusy(
                f"all {self.processes} decoder processes stayed busy for "
                f"limits.decode_timeout_s ({self.timeout_s:g} s); try again"
            )
        try:
            return self._call(function, args)
        finally:
            self._free.release()

    def close(self) -> None:
        """End the idle decoders (a busy one ends when its caller is done with it and the
        process exits); a later :meth:`run` starts new ones."""
        with self._lock:
            idle, self._idle = self._idle, []
        for decoder in idle:
            decoder.requests.close()  # the decoder reads the end of its input and exits
            decoder.process.join(5)
            _end(decoder)

    def _call(self, function: Callable[..., T], args: tuple[Any, ...]) -> T:
        decoder = self._take()
        try:
            return self._exchange(decoder, function, args)
        except (DecodeFailed, DecodersBusy):
            raise  # the decoder was ended, or is idle again
        except BaseException:
            # Unpicklable arguments, an interrupt mid-way: its state is unknown, end it.
            if decoder.process.is_alive():
                _end(decoder)
            raise

    def _exchange(self, decoder: _Decoder, function: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            decoder.requests.send((function, args))
        except (OSError, ValueError):  # it died while idle: not this request's doing
            _end(decoder)
            decoder = self._start()
            decoder.requests.send((function, args))
        if not decoder.replies.poll(self.timeout_s):
            _end(decoder)
            raise _failed(
                f"took longer than limits.decode_timeout_s ({self.timeout_s:g} s); its "
                "decoder process was stopped",
                "decode_timeout_s",
            )
        try:
            kind, value = decoder.replies.recv()
        except (EOFError, OSError):
            code = _end(decoder)
            raise _failed(
                f"its decoder process ended ({_exit_reason(code)}), e.g. on a failed "
                f"allocation under limits.decode_memory_mb ({self.memory_mb} MiB)",
                "decode_memory_mb",
            ) from None
        if kind == "memory":
            _end(decoder)  # a fresh heap for the next decode
            raise _failed(
                f"needed more than limits.decode_memory_mb ({self.memory_mb} MiB)",
                "decode_memory_mb",
            )
        with self._lock:
            self._idle.append(decoder)
        if kind == "error":
            raise DecodeFailed(value)
        return value  # type: ignore[no-any-return]

    def _take(self) -> _Decoder:
        with self._lock:
            while self._idle:
                decoder = self._idle.pop()
                if decoder.process.is_alive():
                    return decoder
                _end(decoder)
        return self._start()

    def _start(self) -> _Decoder:
        their_requests, our_requests = _SPAWN.Pipe(duplex=False)
        our_replies, their_replies = _SPAWN.Pipe(duplex=False)
        for end in (our_requests, our_replies):
            _widen(end)
        process = _SPAWN.Process(
            target=decoder_main,
            args=(their_requests, their_replies, self.memory_mb << 20, PRELOADED),
            name="hilum-decoder",
            daemon=True,  # ended with the process that owns it
        )
        process.start()
        their_requests.close()
        their_replies.close()
        decoder = _Decoder(process, our_requests, our_replies)
        try:
            ready = our_replies.poll(START_TIMEOUT_S) and our_replies.recv()
        except (EOFError, OSError):
            ready = False
        if ready != "ready":
            code = _end(decoder)
            raise DecodersBusy(f"a decoder process did not start ({_exit_reason(code)})")
        log.debug("decoder process %d started", process.pid)
        return decoder


def _widen(end: Connection) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or over pipe-max-size
        fcntl.fcntl(end.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)


def _failed(message: str, limit: str) -> DecodeFailed:
    log.warning("a decode was stopped: %s", message)
    return DecodeFailed(message, limit)


def _end(decoder: _Decoder) -> int | None:
    """Stop the decoder (when still running) and reap it; its exit code."""
    if decoder.process.is_alive():
        decoder.process.kill()
    decoder.process.join()
    decoder.close()
    return decoder.process.exitcode


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _in_process(function: Callable[..., T], args: tuple[Any, ...]) -> T:
    try:
        return function(*args)
    except MemoryError:
        raise DecodeFailed("ran out of memory (decoded in process)", "decode_memory_mb") from None
    except Exception as error:  # noqa: BLE001 (pydicom and its plug-ins raise many kinds)
        raise DecodeFailed(_reason(error)) from error


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


# -- the decoder process --------------------------------------------------------------------


def decoder_main(
    requests: Connection, replies: Connection, memory_bytes: int, preload: Sequence[str]
) -> None:
    """A decoder process: import the decode jobs' modules, set the limits, then run what
    arrives until the owner closes its end."""
    # A terminal's Ctrl-C reaches the whole process group; the owner decides when this ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in preload:
        importlib.import_module(name)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core of patient data
    limit = _address_space() + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    replies.send("ready")
    while True:
        try:
            function, args = requests.recv()
        except EOFError:
            return
        except MemoryError:
            replies.send(("memory", None))
            return
        try:
            reply: tuple[str, Any] = ("ok", function(*args))
        except MemoryError:
            reply = ("memory", None)
        except Exception as error:  # noqa: BLE001 (the decoder's errors are the caller's answer)
            reply = ("error", _reason(error))
        try:
            replies.send(reply)
        except MemoryError:
            reply = ("memory", None)
            replies.send(reply)
        if reply[0] == "memory":
            return


def _address_space() -> int:
    """This process's virtual memory size now (Linux: VmSize of /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmSize")
