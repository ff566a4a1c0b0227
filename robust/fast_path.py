"""The inference fast path: one copy of a frozen model, built once per evaluation, that attacks run on.

:func:`fast_model` takes a classifier (``N×C×H×W`` images in [0, 1] -> ``N×K`` logits) and returns a deep copy that
computes the same function at a lower cost: eval mode, parameters frozen (``requires_grad`` off, so nothing can
accumulate in them), every BatchNorm that follows a convolution folded into it (``torch.fx``'s ``fuse``), and, on the
CPU, weights in channels-last memory format where the convolutions are wide, and the convolutions of
:mod:`robust.fast_convs` where oneDNN's kernels are slower: the stem's input gradient as a matrix product, the wide
3×3 layers by Winograd's F(2×2, 3×3) (each measured in ``docs/benchmarks.md``). The user's model object is
never changed. The copy is for input gradients on fixed weights (the report, ``fool``, validation's threat suite,
the overfitting guard's probe): never train it, and build a new one when the weights change (validation builds one
per epoch, the guard one per probe). Training's own attack runs on the weights that train.

These change the float rounding, not the function: folding computes ``w·(x - μ)/σ`` as ``(w/σ)·x - w·μ/σ``, the
layout, the matmul gradient and Winograd sum in another order, so logits and gradients move by a few float32 ulps of
their size (about 1e-6 on the models here; ``tests/test_fast_path.py`` states the bound), and a prediction can change
only where its top-2 logit margin is that small.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.nn.modules.batchnorm import _BatchNorm

from robust.fast_convs import speed_up_convs


def fast_model(model: nn.Module, channels_last: bool | None = None) -> nn.Module:
    """A frozen, folded copy of ``model`` for attacks on fixed weights (module docstring); ``model`` is untouched.

    ``channels_last``: weights in channels-last memory format (default: :func:`prefers_channels_last`). The copy lives
    on ``model``'s device and takes and returns what ``model`` does (a card it carries is copied with it)."""
    fast = _fold(copy.deepcopy(model).eval().requires_grad_(False))
    if _on_cpu(fast):
        speed_up_convs(fast)
    if prefers_channels_last(fast) if channels_last is None else channels_last:
        # A convolution whose weight is channels-last makes its output so, and the layers after it follow; the
        # gradient comes back to the input in the input's own layout, so callers see no difference.
        fast = fast.to(memory_format=torch.channels_last)
    return fast


WIDE_CONV = 64  # output channels from which oneDNN's channels-last convolutions paid on the CPU (docs/benchmarks.md)


def prefers_channels_last(model: nn.Module) -> bool:
    """Whether channels-last pays for ``model``, as measured: on the CPU, for a network with a 2-D convolution of
    :data:`WIDE_CONV` output channels or more (ResNet18 and PreAct-ResNet18 gained; ``mnist_net``'s two narrow
    convolutions lost, as their layout conversions cost more than they save). On CUDA it is unmeasured in fp32: off."""
    wide = any(isinstance(m, nn.Conv2d) and m.out_channels >= WIDE_CONV for m in model.modules())
    return _on_cpu(model) and wide


def _on_cpu(model: nn.Module) -> bool:
    param = next(model.parameters(), None)
    return param is None or param.device.type == "cpu"


def _fold(module: nn.Module) -> nn.Module:
    """``module`` with each BatchNorm that follows a convolution folded into it: the whole module where ``torch.fx``
    can trace it, else each child that it can (a wrapper whose ``forward`` branches on its input, as a
    :class:`robust.models.build.CardedModel` checking channels, is kept and its layers folded inside)."""
    if not any(isinstance(m, _BatchNorm) for m in module.modules()):
        return module
    try:
        folded = fuse(module, inplace=True)
    except Exception:  # noqa: BLE001 - fx raises many types (TraceError, TypeError, ...) for untraceable Python
        for name, child in module.named_children():
            setattr(module, name, _fold(child))
        return module
    return _keep_attributes(folded, module)


def _keep_attributes(folded: nn.Module, original: nn.Module) -> nn.Module:
    """``folded`` (an ``fx.GraphModule``) with the plain attributes ``original`` carried besides its layers (a card),
    so code that reads them from the model still finds them."""
    for key, value in vars(original).items():
        if not key.startswith("_") and key != "training" and not hasattr(folded, key):
            setattr(folded, key, value)
    return folded
