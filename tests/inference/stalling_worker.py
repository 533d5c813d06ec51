"""``hilum worker`` that hangs after storing a job's SEG and SR, just before marking the job
done: the worst moment to be killed. Tests run it as a process and kill it with SIGKILL.

Usage: python -m tests.inference.stalling_worker  (configured by HILUM_* variables)
"""

from __future__ import annotations

import sys
import threading

from server.cli import main
from storage.jobs import JobQueue


def _hang(*_args: object, **_kwargs: object) -> bool:
    print("STALLED before marking the job done", flush=True)
    threading.Event().wait()
    return False


if __name__ == "__main__":
    JobQueue.complete = _hang  # type: ignore[method-assign]
    sys.exit(main(["worker"]))
