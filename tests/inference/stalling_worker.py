"""A worker that hangs once it has stored a job's SEG and SR, just before marking the job done:
the worst moment to be killed. Tests run it as a process and kill it with SIGKILL.

It is the worker ``hilum worker`` runs, built through its public API, on an archive whose
``on_ingest`` (told after each stored result is committed) stops it after the third result.

Usage: python -m tests.inference.stalling_worker  (configured by HILUM_* variables)
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

from config import load_settings
from inference.registry import load_models
from inference.worker import Worker
from storage.archive import open_archive

RESULTS = 3  # the SEG, the measurement report SR, the SR of the lesions' outlines


def main() -> None:
    settings = load_settings()
    stored: list[object] = []

    def hang_after_the_last_result(outcomes: Sequence[object]) -> None:
        stored.extend(outcomes)
        if len(stored) >= RESULTS:
            print("STALLED before marking the job done", flush=True)
            threading.Event().wait()

    archive = open_archive(settings)
    hanging = dataclasses.replace(archive, on_ingest=hang_after_the_last_result)
    worker = Worker(settings, hanging, load_models(settings.inference.models_dirs))
    print(f"Hilum worker {worker.name} (stalling after {RESULTS} results)", flush=True)
    worker.run(threading.Event())


if __name__ == "__main__":
    main()
