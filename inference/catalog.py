"""The installed models as the web side needs them, without importing torch to list them.

:func:`manifest_names` reads only the names from the manifests (for a page's list of models);
:class:`ModelCatalog` loads the models (``inference.registry``, torch) the first time one is
asked for, once per process, for a model run by hand."""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from inference.errors import ModelError

if TYPE_CHECKING:
    from inference.registry import Model

MANIFEST = "model.toml"
REFERENCE_MODELS_DIR = Path(__file__).parent / "reference_models"


def manifest_names(directories: Sequence[Path]) -> list[str]:
    """The ``name`` of each model folder's manifest, sorted; unreadable manifests are left out
    (``hilum models list`` and the worker say what is wrong with them)."""
    names = set()
    for directory in directories:
        for manifest in sorted(Path(directory).glob(f"*/{MANIFEST}")):
            try:
                with open(manifest, "rb") as f:
                    name = tomllib.load(f).get("name")
            except (OSError, tomllib.TOMLDecodeError):
                continue
            if isinstance(name, str) and name:
                names.add(name)
    return sorted(names)


class ModelCatalog:
    def __init__(self, directories: Sequence[Path]) -> None:
        self.directories = list(directories)
        self._models: dict[str, Model] | None = None
        self._lock = threading.Lock()

    def get(self, name: str) -> Model:
        """The installed model ``name``; :class:`ModelError` if there is none (or the models
        cannot be loaded)."""
        with self._lock:
            if self._models is None:
                from inference.registry import load_models

                self._models = {m.name: m for m in load_models(self.directories)}
        model = self._models.get(name)
        if model is None:
            raise ModelError(
                f"no installed model {name!r} (installed: {', '.join(self._models) or 'none'})"
            )
        return model
