"""The inference fast path: one copy of a frozen model, built once per evaluation, that attacks run on.

:func:`fast_model` takes a classifier (``N×C×H×W`` images in [0, 1] -> ``N×K`` logits) and returns a deep copy that
computes the same function at a lower cost: eval mode, parameters frozen (``requires_grad`` off, so nothing can
accumulate in them), every BatchNorm that follows a convolution folded into it (``torch.fx``'s ``fuse``), and, on the
CPU, weights in channels-last memory format where the convolutions are wide, and the input gradient of a convolution
on few channels (the stem on the image) as one matrix product and a col2im (``F.fold``) instead of oneDNN's
backward-data kernel, 3× slower on those shapes (both measured in ``docs/benchmarks.md``). The user's model object
is never changed. The copy is for input gradients on fixed weights (the report, ``fool``, validation's threat suite,
the overfitting guard's probe): never train it, and build a new one when the weights change (validation builds one
per epoch, the guard one per probe). Training's own attack runs on the weights that train.

These change the float rounding, not the function: folding computes ``w·(x - μ)/σ`` as ``(w/σ)·x - w·μ/σ``, the
layout and the matmul gradient sum in another order, so logits and gradients move by a few float32 ulps of their size
(about 1e-6 on the models here; ``tests/test_fast_path.py`` states the bound), and a prediction can change only where
its top-2 logit margin is that small.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse
from torch.nn.modules.batchnorm import _BatchNorm


def fast_model(model: nn.Module, channels_last: bool | None = None) -> nn.Module:
    """A frozen, folded copy of ``model`` for attacks on fixed weights (module docstring); ``model`` is untouched.

    ``channels_last``: weights in channels-last memory format (default: :func:`prefers_channels_last`). The copy lives
    on ``model``'s device and takes and returns what ``model`` does (a card it carries is copied with it)."""
    fast = _fold(copy.deepcopy(model).eval().requires_grad_(False))
    if _on_cpu(fast):
        _narrow_convs_by_matmul(fast)
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


NARROW_CONV = 3  # input channels up to which the matmul input gradient beat oneDNN's on the CPU (1 and 3 won; 16 lost)


class _MatmulInputGrad(torch.autograd.Function):
    """A frozen convolution whose input gradient is ``Wᵀ·grad`` (one batched matrix product: ``N×(C·k·k)×L``
    columns) folded back onto the ``N×C×H×W`` input (col2im): the same sum as the convolution's own backward, in
    another order. No gradient for the weight or bias (the fast path's are frozen)."""

    @staticmethod
    def forward(ctx, x, conv: nn.Conv2d):
        ctx.conv, ctx.size = conv, x.shape[-2:]
        return conv._conv_forward(x, conv.weight, conv.bias)

    @staticmethod
    def backward(ctx, grad):
        conv = ctx.conv
        cols = conv.weight.flatten(1).T @ grad.flatten(2)
        return F.fold(cols, ctx.size, conv.kernel_size, conv.dilation, conv.padding, conv.stride), None


class _NarrowConv2d(nn.Conv2d):
    """A frozen :class:`nn.Conv2d` on at most :data:`NARROW_CONV` input channels, input gradient by
    :class:`_MatmulInputGrad`."""

    def forward(self, x: Tensor) -> Tensor:
        return _MatmulInputGrad.apply(x, self)


def _narrow_convs_by_matmul(model: nn.Module) -> None:
    """Give each plain convolution of ``model`` on at most :data:`NARROW_CONV` input channels (zero padding, one
    group, no dilation beyond what fold handles) the matmul input gradient, in place."""
    for conv in model.modules():
        plain = type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
        if plain and conv.in_channels <= NARROW_CONV and not isinstance(conv.padding, str):
            conv.__class__ = _NarrowConv2d


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
