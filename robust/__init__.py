"""robust: adversarially robust image classifiers with PyTorch Lightning.

``from robust import load_model`` imports torch on first use only, so torch-free parts (``robust.checks``,
``robust.card``) stay instant; nothing here imports Lightning.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from robust.loading import load_model

        return load_model
    raise AttributeError(f"module 'robust' has no attribute {name!r}")
