"""The model plug-in format and the registry that loads it.

A model is a folder holding ``model.toml`` (the manifest, validated here at load) and the
TorchScript weights it names. ``docs/models.md`` documents the format for data scientists; the
reference models under ``inference/reference_models/`` are examples of it.
"""

from __future__ import annotations

import tomllib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydicom.sr.coding import Code

from inference.errors import ModelError
from inference.rules import series_matches

REFERENCE_MODELS_DIR = Path(__file__).parent / "reference_models"
MANIFEST = "model.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeItem(_Strict):
    """A coded concept (PS3.3 8.8): e.g. ``{ scheme = "SCT", value = "108369006", meaning =
    "Neoplasm" }``. SNOMED CT codes use the scheme designator ``SCT`` (PS3.16 8)."""

    scheme: str = Field(min_length=1, max_length=16)
    value: str = Field(min_length=1, max_length=64)
    meaning: str = Field(min_length=1, max_length=64)

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class AppliesTo(_Strict):
    """Which series the model runs on: every non-empty list must contain the series' value
    (an empty list matches anything). BodyPartExamined is compared case-insensitively."""

    modalities: list[str] = []
    sop_class_uids: list[str] = []
    body_parts: list[str] = []


class Preprocessing(_Strict):
    """How stored pixels become the model's input.

    Slice models (``kind = "slice"``): rescale to modality values (e.g. HU, PS3.3 C.11.1.1.2),
    then map ``[window_center - window_width/2, window_center + window_width/2]`` to [0, 1]
    and resample each slice to ``input_size`` pixels (when set). Tile models
    (``kind = "tile"``): RGB scaled to [0, 1], cut into ``tile_size`` tiles of the pyramid level
    nearest ``magnification`` (10 µm per pixel divided by the magnification, e.g. 20x = 0.5 µm).
    """

    window_center: float | None = None
    window_width: Annotated[float, Field(gt=0)] | None = None
    input_size: Annotated[int, Field(ge=8, le=4096)] | None = None
    tile_size: Annotated[int, Field(ge=16, le=4096)] | None = None
    magnification: Annotated[float, Field(gt=0)] | None = None
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 8


class Label(_Strict):
    """One output channel of the network: a segment of the SEG and a finding of the SR."""

    label: str = Field(min_length=1, max_length=64)
    # Segment Description (PS3.3 C.8.20.2): Segmented Property Category / Type Code Sequences.
    category: CodeItem
    type: CodeItem
    # TID 1500 / TID 1411: Finding (type) and Finding Site.
    finding_type: CodeItem
    finding_site: CodeItem | None = None
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    # Components smaller than this (pixels of the model input) are dropped as noise.
    min_pixels: Annotated[int, Field(ge=0)] = 0


class Outputs(_Strict):
    seg: bool = True
    sr: bool = True


class ModelManifest(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,15}$")
    # The algorithm's name as written into the SEG and SR (Algorithm Name, LO: 64 characters).
    algorithm_name: str = Field(min_length=1, max_length=64)
    description: str = ""
    kind: Literal["slice", "tile"]
    weights: str = "model.pt"
    applies_to: AppliesTo = AppliesTo()
    preprocessing: Preprocessing = Preprocessing()
    labels: list[Label] = Field(min_length=1)
    outputs: Outputs = Outputs()

    @model_validator(mode="after")
    def _kind_needs(self) -> ModelManifest:
        p = self.preprocessing
        if self.kind == "slice" and (p.window_center is None) != (p.window_width is None):
            raise ValueError("window_center and window_width go together")
        if self.kind == "tile" and p.tile_size is None:
            raise ValueError('a kind = "tile" model needs preprocessing.tile_size')
        if not (self.outputs.seg or self.outputs.sr):
            raise ValueError("outputs: at least one of seg and sr must be true")
        return self


@dataclass(frozen=True)
class Model:
    name: str
    version: str
    path: Path
    manifest: ModelManifest
    _network: list[torch.jit.ScriptModule] = field(default_factory=list, repr=False, compare=False)

    @property
    def weights_path(self) -> Path:
        return self.path / self.manifest.weights

    @property
    def is_reference(self) -> bool:
        """One of Hilum's reference models: trained on synthetic data, not for clinical use."""
        return self.path.resolve().parent == REFERENCE_MODELS_DIR.resolve()

    def applies_to(self, series: Mapping[str, str]) -> bool:
        """Whether the series (keys "Modality", "SOPClassUID", "BodyPartExamined") is one
        this model runs on."""
        rule = self.manifest.applies_to
        return series_matches(
            series,
            modalities=rule.modalities,
            sop_class_uids=rule.sop_class_uids,
            body_parts=rule.body_parts,
        )

    def network(self, device: str) -> torch.jit.ScriptModule:
        """The TorchScript network on ``device``, loaded once per Model."""
        if not self._network:
            try:
                with warnings.catch_warnings():
                    # TorchScript is the plug-in format; torch 2.x marks it deprecated.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    network = torch.jit.load(str(self.weights_path), map_location="cpu")
            except (RuntimeError, OSError, ValueError) as error:
                raise ModelError(
                    f"model {self.name}: cannot load TorchScript weights "
                    f"{self.weights_path}: {error}"
                ) from error
            network.eval()
            self._network.append(network)
        return self._network[0].to(device)


def load_model(folder: Path) -> Model:
    """The model in ``folder``; :class:`ModelError` says what is wrong with it."""
    manifest_path = folder / MANIFEST
    try:
        raw = tomllib.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ModelError(f"{folder}: no {MANIFEST}") from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{manifest_path}: not valid TOML: {error}") from error
    try:
        manifest = ModelManifest.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in error.errors()
        )
        raise ModelError(f"{manifest_path}: {problems}") from error
    model = Model(manifest.name, manifest.version, folder, manifest)
    if not model.weights_path.is_file():
        raise ModelError(f"{manifest_path}: weights file {model.weights_path} does not exist")
    return model


def load_models(directories: Sequence[Path]) -> list[Model]:
    """Every model folder (a sub-folder holding ``model.toml``) under ``directories``, sorted
    by name. Two models with the same name are an error: the name identifies a model's jobs."""
    models: dict[str, Model] = {}
    for directory in directories:
        if not directory.is_dir():
            raise ModelError(f"model directory {directory} does not exist")
        for folder in sorted(p for p in directory.iterdir() if (p / MANIFEST).is_file()):
            model = load_model(folder)
            if model.name in models:
                raise ModelError(
                    f"two models named {model.name!r}: {models[model.name].path} and {folder}"
                )
            models[model.name] = model
    return [models[name] for name in sorted(models)]
