"""Trains the synthetic CT lesion U-Net and writes ``model.pt`` (TorchScript) beside this file.

    .venv/bin/python inference/reference_models/ct_lesion_synthetic/train.py

Reproducible: the training data are synthetic phantoms generated here (``inference.phantoms``,
seeds 1000 and up; the tests hold out seeds below 1000), torch is seeded, and nothing is
downloaded. Runs on the CPU in a few minutes. Trained on synthetic data: not for clinical use.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=64, help="training crop (pixels)")
    parser.add_argument("--output", type=Path, default=HERE / "model.pt")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, y = dataset(range(1000, 1064))
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
