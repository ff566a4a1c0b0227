"""robust: adversarially robust image classifiers with PyTorch Lightning.

The package follows the flow of a model: :mod:`robust.data` (images in [0, 1] and data modules) →
:mod:`robust.models` (architectures, the model card, one resolver from any spec to a carded model) →
:mod:`robust.attacks`, :mod:`robust.defenses`, :mod:`robust.threats`, :mod:`robust.objectives` (pure functions) →
:mod:`robust.training` (the LightningModule and its callbacks) → :mod:`robust.evaluation` (the report, ``fool``) →
:mod:`robust.export` (safetensors, ONNX). ``docs/architecture.md`` draws it.

``from robust import load_model`` imports torch on first use only, so torch-free parts (``robust.checks``,
``robust.models.card``) stay instant; nothing here imports Lightning. Modules that moved keep importing from their
old paths with one warning line (:mod:`robust.moved`).
"""

from __future__ import annotations

from typing import Any

from robust import moved

moved.install()

__all__ = ["load_model", "create_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from robust.models import resolve

        return getattr(resolve, name)
    raise AttributeError(f"module 'robust' has no attribute {name!r}")
