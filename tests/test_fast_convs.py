"""The fast path's convolutions (robust/fast_convs.py): the same function and input gradient as ``nn.Conv2d``
within float32 rounding, swapped in only where their shape is served.

The bound, and why: both sum the same products in another order (Winograd after transforming the kernel in float64
and the tiles by additions), so each output moves by a few float32 ulps of the layer's output scale, growing with
the number of terms (C·9). ``RELATIVE`` = 1e-5 of the largest output is three times the worst measured (3e-6 at 512
channels), the most any test here sums (ResNet18's stage 4)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robust.fast_convs import NarrowConv2d, WinogradConv2d, speed_up_convs
from robust.models.build import CIFAR10_MEAN, CIFAR10_STD, build_model

RELATIVE = 1e-5


def frozen(make, cls: type) -> tuple[nn.Conv2d, object]:
    """The convolution ``make()`` builds (seeded weights), frozen and swapped to ``cls``, and the plain convolution
    of the same weights."""
    torch.manual_seed(0)
    conv = make().eval().requires_grad_(False)
    reference = nn.Conv2d.forward.__get__(conv)  # the plain convolution of the same weights
    conv.__class__ = cls
    if cls is WinogradConv2d:
        conv.prepare()
    return conv, reference


def output_and_input_grad(forward, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = forward(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out, grad


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert (got - want).abs().max() <= RELATIVE * want.abs().max()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_gives_the_convolution_and_its_input_gradient(layout, bias):
    conv, reference = frozen(lambda: nn.Conv2d(12, 20, 3, padding=1, bias=bias), WinogradConv2d)
    x = torch.randn(3, 12, 6, 10, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=layout)
    got, want = (output_and_input_grad(f, x, seed=2) for f in (conv, reference))
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_winograd_leaves_odd_sizes_to_the_plain_convolution():
    conv, reference = frozen(lambda: nn.Conv2d(8, 8, 3, padding=1), WinogradConv2d)
    x = torch.randn(2, 8, 7, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(conv(x), reference(x))


def test_the_matmul_input_gradient_of_a_narrow_stride_2_convolution():
    conv, reference = frozen(lambda: nn.Conv2d(1, 16, 4, stride=2, padding=1), NarrowConv2d)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    got, want = (output_and_input_grad(f, x, seed=5) for f in (conv, reference))
    assert torch.equal(got[0], want[0])  # the forward is the convolution's own
    assert_close(got[1], want[1])


def test_only_the_shapes_served_are_swapped():
    """A CIFAR-stem ResNet18: the stem (3 channels) takes the matmul gradient; the 3×3 stride-1 convolutions of 256
    and 512 channels (stages 3 and 4: two blocks each, both convolutions but the first strided one) take Winograd;
    the rest stay plain, and the state dict is unchanged."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, mean=CIFAR10_MEAN, std=CIFAR10_STD, cifar_stem=True).eval()
    plain = copy.deepcopy(model)
    speed_up_convs(model)
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    winograd = {name for name, kind in kinds.items() if kind is WinogradConv2d}
    assert kinds["backbone.conv1"] is NarrowConv2d
    expected = {f"backbone.layer{s}.{b}.conv{c}" for s in (3, 4) for b in (0, 1) for c in (1, 2)}
    assert winograd == expected - {"backbone.layer3.0.conv1", "backbone.layer4.0.conv1"}
    assert sum(kind is nn.Conv2d for kind in kinds.values()) == len(kinds) - 1 - len(winograd)
    assert model.state_dict().keys() == plain.state_dict().keys()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_close(model(x), plain(x))
