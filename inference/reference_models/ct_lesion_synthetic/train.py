"""Trains the synthetic CT lesion U-Net and writes ``model.pt`` (TorchScript) beside this file.

    .venv/bin/python inference/reference_models/ct_lesion_synthetic/train.py
    .venv/bin/python inference/reference_models/ct_lesion_synthetic/train.py \
        --dataset EXPORT --epochs 1 --output model.pt     # a `hilum export --dataset` folder

Reproducible: the training data are synthetic phantoms generated here (``inference.phantoms``,
seeds 1000 and up; the tests hold out seeds below 1000), torch is seeded, and nothing is
downloaded. Runs on the CPU in a few minutes. Trained on synthetic data: not for clinical use.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root

from inference.phantoms import ct_phantom_volume  # noqa: E402
from inference.unet import UNet, save_torchscript, train_step  # noqa: E402

HERE = Path(__file__).parent
WINDOW_CENTER, WINDOW_WIDTH = 50.0, 400.0  # as in model.toml


def windowed(hu: np.ndarray) -> np.ndarray:
    low = WINDOW_CENTER - WINDOW_WIDTH / 2
    return np.clip((hu.astype(np.float32) - low) / WINDOW_WIDTH, 0.0, 1.0)


def dataset(seeds: range) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = [], []
    for seed in seeds:
        hu, mask = ct_phantom_volume(seed)
        images.append(windowed(hu))
        masks.append(mask)
    x = torch.from_numpy(np.concatenate(images))[:, None]
    y = torch.from_numpy(np.concatenate(masks).astype(np.float32))[:, None]
    return x, y


def exported_dataset(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The CT series of a training set written by ``hilum export --dataset`` (its
    ``manifest.json``) and their labels: the AI's SEG segments, less those of findings a
    reviewer rejected. Series without a SEG are left out (nothing to learn from)."""
    import highdicom as hd
    from pydicom import dcmread

    manifest = json.loads((folder / "manifest.json").read_text())
    images, masks = [], []
    for series in manifest["series"]:
        labelled = [label for label in series["labels"] if label["segmentation"]]
        if series["Modality"] != "CT" or not labelled:
            continue
        slices = sorted((dcmread(folder / path) for path in series["images"]),
                        key=lambda ds: int(ds.InstanceNumber))  # fmt: skip
        hu = np.stack(
            [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices]
        )
        mask = np.zeros(hu.shape, bool)
        for label in labelled:
            rejected = {
                finding["segment_number"]
                for finding in label["findings"]
                if (finding["decision"] or {}).get("decision") == "rejected"
            }
            seg = hd.seg.segread(folder / label["segmentation"])
            kept = [n for n in seg.segment_numbers if n not in rejected]
            if kept:
                mask |= seg.get_pixels_by_source_instance(
                    [ds.SOPInstanceUID for ds in slices],
                    segment_numbers=kept,
                    combine_segments=True,
                    assert_missing_frames_are_empty=True,
                ).astype(bool)
        images.append(windowed(hu))
        masks.append(mask)
    if not images:
        raise SystemExit(f"{folder}: no CT series with a SEG label in manifest.json")
    x = torch.from_numpy(np.concatenate(images))[:, None]
    y = torch.from_numpy(np.concatenate(masks).astype(np.float32))[:, None]
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=64, help="training crop (pixels)")
    parser.add_argument("--output", type=Path, default=HERE / "model.pt")
    parser.add_argument(
        "--dataset", type=Path, help="train on a `hilum export --dataset` folder, not phantoms"
    )
    parser.add_argument(
        "--epochs", type=int, default=0, help="passes over the slices (instead of --steps)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, y = exported_dataset(args.dataset) if args.dataset else dataset(range(1000, 1064))
    args.crop = min(args.crop, x.shape[-1])
    if args.epochs:
        args.steps = args.epochs * math.ceil(len(x) / args.batch)
    print(f"{len(x)} slices, {int(y.sum())} lesion pixels, {args.steps} steps")
    model = UNet(channels=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 3e-3, total_steps=args.steps)
    started = time.monotonic()
    for step in range(args.steps):
        # Random crops: the network is fully convolutional, and crops train four times faster.
        index = torch.from_numpy(rng.integers(0, len(x), args.batch))
        top, left = rng.integers(0, x.shape[-1] - args.crop + 1, 2)
        window = (index, slice(None), slice(top, top + args.crop), slice(left, left + args.crop))
        xb, yb = x[window], y[window]
        if step % 2:  # flips: lesions have no preferred side
            xb, yb = xb.flip(-1), yb.flip(-1)
        loss = train_step(model, optimiser, schedule, xb, yb)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss:.4f}  {time.monotonic() - started:.0f}s")
    save_torchscript(model, args.output)


if __name__ == "__main__":
    main()
