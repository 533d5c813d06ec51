"""Model plug-ins made by the tests: a ``model.toml`` and a tiny TorchScript network, written
into a folder the way a data scientist would (docs/models.md)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

_LABEL = """
[[labels]]
label = "Lesion"
category = { scheme = "SCT", value = "49755003", meaning = "Morphologically Abnormal Structure" }
type = { scheme = "SCT", value = "52988006", meaning = "Lesion" }
finding_type = { scheme = "SCT", value = "52988006", meaning = "Lesion" }
"""


class FailingNetwork(torch.nn.Module):
    """A network that raises on every batch, as a broken model would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("test model: deliberate failure in forward()")


def failing_ct_model(directory: Path, name: str = "failing_ct_test") -> Path:
    """A slice model for CT whose network always raises."""
    folder = directory / name
    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is the plug-in format
        torch.jit.save(torch.jit.script(FailingNetwork()), str(folder / "model.pt"))
    (folder / "model.toml").write_text(
        f'name = "{name}"\nversion = "0.1"\nalgorithm_name = "Hilum test model that raises"\n'
        'kind = "slice"\n\n[applies_to]\nmodalities = ["CT"]\n' + _LABEL
    )
    return folder
