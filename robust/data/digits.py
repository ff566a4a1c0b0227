"""scikit-learn's embedded digits as tensors, and the fixed train/val split of :class:`robust.data.modules.Digits`
(no Lightning: the reference digits model of the tests and benchmarks trains from here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def digits_tensors(size: int = 32, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits as ``N×channels×size×size`` float [0, 1] images and ``N`` int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return x.expand(-1, channels, -1, -1).contiguous(), torch.tensor(bunch.target, dtype=torch.int64)


def digits_split(
    size: int = 32, channels: int = 3, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((x_train, y_train), (x_val, y_val))``: the digits of :func:`digits_tensors` split 80/20 by a permutation
    drawn from ``seed`` (1,437 and 360 images; the same on any machine)."""
    x, y = digits_tensors(size, channels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(y))
    train, val = order[:n_train], order[n_train:]
    return (x[train], y[train]), (x[val], y[val])
