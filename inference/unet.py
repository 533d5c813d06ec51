"""The small U-Net both reference models are trained with, and the training step and export
they share (their ``train.py`` scripts).

Training only: the worker loads each model's TorchScript file, which carries its own graph.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A small U-Net (Ronneberger et al. 2015): three levels, 16-32-64 channels."""

    def __init__(self, channels: int, labels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.enc1 = block(channels, width)
        self.enc2 = block(width, width * 2)
        self.bottom = block(width * 2, width * 4)
        self.up2 = nn.ConvTranspose2d(width * 4, width * 2, 2, stride=2)
        self.dec2 = block(width * 4, width * 2)
        self.up1 = nn.ConvTranspose2d(width * 2, width, 2, stride=2)
        self.dec1 = block(width * 2, width)
        self.head = nn.Conv2d(width, labels, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    return 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)


_BCE = nn.BCEWithLogitsLoss()


def train_step(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    xb: torch.Tensor,
    yb: torch.Tensor,
) -> float:
    """One optimisation step on a batch (binary cross-entropy + Dice loss); the loss."""
    logits = model(xb)
    loss = _BCE(logits, yb) + dice_loss(logits, yb)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    schedule.step()
    return loss.item()


def save_torchscript(model: nn.Module, output: Path) -> None:
    """The weights file the worker loads: the model scripted with TorchScript."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), str(output))
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")
