"""Data: images as ``N×C×H×W`` floats in [0, 1], labels ``N``.

- :mod:`robust.data.modules`: the LightningDataModules training uses (``Digits``, ``MNIST``, ``CIFAR10``,
  ``ImageFolder``); configs name them ``robust.data.<name>``, which resolves here on first use (no Lightning import
  before that).
- :mod:`robust.data.images`: safe loading of a user's image file (every bad file is one line), PNG bytes.
- :mod:`robust.data.eval_data`: the report's images at a model card's size and channels.
- :mod:`robust.data.roots`: where the data sets are (``$ROBUST_DATA``).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib

    try:
        return getattr(importlib.import_module("robust.data.modules"), name)
    except AttributeError:
        raise AttributeError(f"module 'robust.data' has no attribute {name!r}") from None
