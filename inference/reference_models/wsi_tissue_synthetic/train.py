"""Trains the synthetic WSI abnormal-tissue U-Net and writes ``model.pt`` (TorchScript) here.

    .venv/bin/python inference/reference_models/wsi_tissue_synthetic/train.py

Reproducible: the training slides are synthetic H&E-like phantoms generated here
(``inference.phantoms.wsi_phantom_image``, seeds 1000 and up; the tests hold out seeds below
1000), passed through the same JPEG baseline coding the phantom slides use; torch is seeded and
nothing is downloaded. Runs on the CPU in a few minutes. Trained on synthetic data: not for
clinical use.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root

from inference.phantoms import jpeg_baseline, wsi_phantom_image  # noqa: E402
from inference.unet import UNet, save_torchscript, train_step  # noqa: E402

HERE = Path(__file__).parent


def slides(seeds: range) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = [], []
    for seed in seeds:
        rgb, mask = wsi_phantom_image(seed)
        # The model sees decoded JPEG baseline tiles at inference; train on the same.
        rgb = np.asarray(Image.open(io.BytesIO(jpeg_baseline(rgb))).convert("RGB"))
        images.append(torch.from_numpy(rgb).permute(2, 0, 1))
        masks.append(torch.from_numpy(mask)[None])
    return torch.stack(images), torch.stack(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=64, help="training crop (pixels)")
    parser.add_argument("--output", type=Path, default=HERE / "model.pt")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, y = slides(range(1000, 1024))
    abnormal = torch.nonzero(y[:, 0])  # (slide, row, column) of abnormal pixels
    model = UNet(channels=3)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 3e-3, total_steps=args.steps)
    size, crop = x.shape[-1], args.crop
    started = time.monotonic()
    for step in range(args.steps):
        xs, ys = [], []
        for item in range(args.batch):
            if item % 2:  # half the crops around abnormal tissue, which is rare
                slide, row, column = abnormal[rng.integers(0, len(abnormal))].tolist()
                top = int(np.clip(row - rng.integers(0, crop), 0, size - crop))
                left = int(np.clip(column - rng.integers(0, crop), 0, size - crop))
            else:
                slide = int(rng.integers(0, len(x)))
                top, left = (int(v) for v in rng.integers(0, size - crop + 1, 2))
            xs.append(x[slide, :, top : top + crop, left : left + crop])
            ys.append(y[slide, :, top : top + crop, left : left + crop])
        xb, yb = torch.stack(xs).float() / 255.0, torch.stack(ys).float()
        if step % 2:
            xb, yb = xb.flip(-1), yb.flip(-1)
        loss = train_step(model, optimiser, schedule, xb, yb)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss:.4f}  {time.monotonic() - started:.0f}s")
    save_torchscript(model, args.output)


if __name__ == "__main__":
    main()
