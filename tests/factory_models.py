"""A user's own network, for the factory-loading tests (``factory_models:small_cnn``)."""

from torch import nn


def small_cnn() -> nn.Module:
    """1×28×28 images -> 10 logits; no normalization of its own."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10))
