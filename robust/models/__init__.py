"""Models: every network takes ``N×C×H×W`` images in [0, 1] (normalization is its first layer) and carries its
:class:`~robust.models.card.ModelCard`.

- :mod:`robust.models.archs`: the architecture registry (:data:`~robust.models.archs.ARCHS`).
- :mod:`robust.models.build`: ``Sequential(Normalize, backbone)``, :class:`~robust.models.build.CardedModel`, weights
  files read safely.
- :mod:`robust.models.card`: the one schema of checkpoints, exports and models, and the one builder of a training
  run's card.
- :mod:`robust.models.hf`: Hugging Face classifiers in the project's convention.
- :mod:`robust.models.resolve`: :func:`create_model` / :func:`load_model`, the one resolver from any spec (arch name,
  ``.ckpt``, export folder, state dict + arch, factory, ``imagenet``, ``hf:``) to a carded model.
"""

from __future__ import annotations

from typing import Any

# The public names, each from its one home; imported on first use, so robust.models.card stays torch-free.
_HOMES = {
    **dict.fromkeys(
        ("CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "CardedModel", "Normalize", "build_model"),
        "build",
    ),
    **dict.fromkeys(("card_of", "head_of"), "build"),
    **dict.fromkeys(("create_model", "load_model"), "resolve"),
    "ARCHS": "archs",
    "ModelCard": "card",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    # any other name: the old flat robust.models, now robust.models.build
    home = importlib.import_module(f"robust.models.{_HOMES.get(name, 'build')}")
    try:
        return getattr(home, name)
    except AttributeError:
        raise AttributeError(f"module 'robust.models' has no attribute {name!r}") from None
