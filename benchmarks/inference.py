"""Throughput of the reference models: slices/s (CT lesion U-Net) and tiles/s (WSI tissue U-Net).

What is measured, per model, on synthetic phantoms (``inference.phantoms``):

* network: the network alone on decoded, preprocessed input, in the manifest's batch size
  (``predict_slices`` / ``predict_tiles``; for tiles this includes JPEG decoding of the frames,
  which happens frame by frame inside the loop); one warm-up pass first;
* analysis: ``analyse_series`` end to end on a temporary embedded archive (SQLite + files): read
  the series through ``storage``, decode, run the network, write the SEG and the SR in memory
  (storing them is the worker's job and not timed here).

* stable to stored: with ``stable_after_s = 0``, one CT study and one WSI study ingested, an idle
  :class:`~inference.worker.Worker` (as ``hilum worker`` runs it) steps once per study: the
  scan marks the study stable and queues its job, the worker claims it, analyses the series,
  and stores the SEG and the SR through the ingest path. The time of each step is the time
  from the study being found stable to its SR being stored.

* last image to result: one CT phantom stored slice by slice into a fresh embedded archive
  with the default settings (``stable_after_s = 30``, ``poll_interval_s = 2``) while a worker
  runs in a thread as in ``hilum serve``; the time from the last slice stored to the job done
  (SEG and SR stored), for each path to "stable": the quiet period (no completion announced),
  and Images in Acquisition (0020,1002) announcing the slice count
  (``[inference] announced_completion``). ``--only-last-image`` measures this alone.

Figures go to stdout; nothing is asserted.

    .venv/bin/python benchmarks/inference.py [--device cuda] [--series 4] [--slices 64]
        [--only-last-image]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import load_settings  # noqa: E402
from inference.analysis import analyse_series, predict_slices, predict_tiles  # noqa: E402
from inference.phantoms import synthetic_ct_series, synthetic_wsi  # noqa: E402
from inference.pixels import slice_stack, tiled_image  # noqa: E402
from inference.registry import REFERENCE_MODELS_DIR, load_model  # noqa: E402
from inference.worker import Worker  # noqa: E402
from storage.archive import open_archive  # noqa: E402
from storage.decoder_pool import DecoderPool  # noqa: E402
from storage.ingest import ingest_file  # noqa: E402


def _rate(count: int, seconds: list[float]) -> str:
    median = statistics.median(seconds)
    return f"{count / median:8.1f}/s  (median {median * 1000:7.1f} ms for {count})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--series", type=int, default=3, help="phantoms per model")
    parser.add_argument("--slices", type=int, default=64, help="slices per CT phantom")
    parser.add_argument("--wsi-size", type=int, default=2048, help="WSI total pixel matrix")
    parser.add_argument("--only-last-image", action="store_true", help="last image to result")
    args = parser.parse_args()
    device = args.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(
        f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    if args.only_last_image:
        with tempfile.TemporaryDirectory() as folder:
            last_image_to_result(Path(folder), args.slices, device)
        return

    ct = load_model(REFERENCE_MODELS_DIR / "ct_lesion_synthetic")
    wsi = load_model(REFERENCE_MODELS_DIR / "wsi_tissue_synthetic")
    cts = [synthetic_ct_series(seed, slices=args.slices) for seed in range(args.series)]
    slides = [synthetic_wsi(seed, size=args.wsi_size) for seed in range(args.series)]

    decoders = DecoderPool.from_limits(load_settings(None).limits)
    stacks = [slice_stack(datasets, decoders) for datasets, _ in cts]
    predict_slices(ct, stacks[0], device)  # warm-up: weights to the device, kernels chosen
    network_ct = []
    for stack in stacks:
        started = time.perf_counter()
        predict_slices(ct, stack, device)
        network_ct.append(time.perf_counter() - started)
    print(f"{ct.name:22s} network   slices {_rate(args.slices, network_ct)}")

    images = [
        tiled_image([slide], wsi.manifest.preprocessing.magnification, decoders)
        for slide, _ in slides
    ]
    tiles = int(slides[0][0].NumberOfFrames)
    predict_tiles(wsi, images[0], device)
    network_wsi = []
    for image in images:
        started = time.perf_counter()
        predict_tiles(wsi, image, device)
        network_wsi.append(time.perf_counter() - started)
    print(f"{wsi.name:22s} network   tiles  {_rate(tiles, network_wsi)}")

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        settings = load_settings(None, server={"data_dir": root / "data"})
        archive = open_archive(settings, migrate=True)
        for index, (datasets, _) in enumerate(cts):
            for number, ds in enumerate(datasets):
                path = root / f"ct-{index}-{number}.dcm"
                ds.save_as(path, enforce_file_format=True)
                ingest_file(archive, path)
        for index, (slide, _) in enumerate(slides):
            path = root / f"wsi-{index}.dcm"
            slide.save_as(path, enforce_file_format=True)
            ingest_file(archive, path)

        def analysis(model, first) -> list[float]:  # type: ignore[no-untyped-def]
            times = []
            for job, ds in enumerate(first):
                started = time.perf_counter()
                analyse_series(
                    archive,
                    model,
                    ds.StudyInstanceUID,
                    ds.SeriesInstanceUID,
                    job_key=f"bench-{job}",
                    device=device,
                )
                times.append(time.perf_counter() - started)
            return times

        ct_times = analysis(ct, [datasets[0] for datasets, _ in cts])
        print(f"{ct.name:22s} analysis  slices {_rate(args.slices, ct_times)}")
        wsi_times = analysis(wsi, [slide for slide, _ in slides])
        print(f"{wsi.name:22s} analysis  tiles  {_rate(tiles, wsi_times)}")
        archive.close()

        stable_to_stored(root / "worker", cts[0][0], slides[0][0], [ct, wsi], device)
        last_image_to_result(root / "last-image", args.slices, device)


def last_image_to_result(root: Path, slices: int, device: str) -> None:
    """Last slice stored -> the CT job done, by the quiet period and by the announced count."""
    import threading

    from inference.registry import load_models
    from storage.jobs import JobQueue, JobState

    for path_name, announce in (("quiet period", False), ("announced count", True)):
        folder = root / path_name.replace(" ", "-")
        settings = load_settings(None, server={"data_dir": folder}, inference={"device": device})
        archive = open_archive(settings, migrate=True)
        datasets, _truth = synthetic_ct_series(7, slices=slices)
        files = []
        for number, ds in enumerate(datasets):
            if announce:
                ds.ImagesInAcquisition = len(datasets)
            path = folder / f"{number}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        worker = Worker(settings, archive, load_models(settings.inference.models_dirs))
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        for path in files:
            ingest_file(archive, path)
        last = time.perf_counter()
        queue = JobQueue(archive, settings.inference)
        study = datasets[0].StudyInstanceUID
        while not any(job.state == JobState.DONE for job in queue.for_study(study)):
            time.sleep(0.1)
        seconds = time.perf_counter() - last
        stop.set()
        thread.join()
        archive.close()
        print(
            f"last image to result, {path_name:15s} {seconds:6.1f} s "
            f"(CT phantom, {len(datasets)} slices; stable_after_s "
            f"{settings.inference.stable_after_s:g}, poll {settings.inference.poll_interval_s:g} s)"
        )


def stable_to_stored(root: Path, ct_series: list, slide: object, models: list, device: str) -> None:
    settings = load_settings(
        None,
        server={"data_dir": root},
        inference={"stable_after_s": 0, "device": device},
    )
    archive = open_archive(settings, migrate=True)
    for number, ds in enumerate([*ct_series, slide]):
        path = root / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)  # type: ignore[attr-defined]
        ingest_file(archive, path)
    worker = Worker(settings, archive, models)
    for _ in models:
        started = time.perf_counter()
        job = worker.step()
        seconds = time.perf_counter() - started
        if job is None:
            raise SystemExit("no job was queued: do the reference models' rules apply?")
        print(
            f"{job.model_name:22s} stable to SR stored {seconds * 1000:7.0f} ms "
            f"(job {job.state}, {len(job.outputs)} objects stored)"
        )
    archive.close()


if __name__ == "__main__":
    main()
