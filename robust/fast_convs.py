"""Convolutions that compute the same function as :class:`nn.Conv2d` at a lower cost on fixed weights, for the
inference fast path (:mod:`robust.fast_path`) on the CPU, where oneDNN's direct kernels were measured slower on
these shapes (``docs/benchmarks.md``). Each is swapped in place of a frozen ``nn.Conv2d`` of its shape (its
``__class__`` changed: same weights, same state dict) and has no weight gradient.

- :class:`NarrowConv2d`, a convolution on at most :data:`NARROW_CONV` input channels (the stem on the image): its
  input gradient is one matrix product and a col2im (``F.fold``) instead of oneDNN's backward-data kernel.
- :class:`WinogradConv2d`, a 3×3 stride-1 convolution of :data:`WINOGRAD_CHANNELS` channels or more (a ResNet's
  third and fourth stages): forward and input gradient by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray,
  "Fast Algorithms for Convolutional Neural Networks", 2016): 16 multiplications per 2×2 output tile where the
  direct sum takes 36, as 16 batched matrix products; the input and output transforms are additions only.

Both sum the same products in another order (Winograd also sums transformed weights, exact in float64 and rounded
once to float32), so outputs and gradients move by float32 rounding: relative 3e-6 of the output's scale measured on
random 512-channel layers (``tests/test_fast_convs.py`` bounds it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NARROW_CONV = 3  # input channels up to which the matmul input gradient beat oneDNN's on the CPU (1 and 3 won; 16 lost)
WINOGRAD_CHANNELS = 256  # in and out channels from which Winograd beat oneDNN's direct kernels (128 tied, 64 lost)


def speed_up_convs(model: nn.Module) -> None:
    """Swap each plain frozen convolution of ``model`` whose shape one of this module's convolutions serves better
    on the CPU for it, in place (``model`` is the fast path's own copy)."""
    for conv in model.modules():
        if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros":
            continue
        if isinstance(conv.padding, str):
            continue
        if conv.in_channels <= NARROW_CONV:
            conv.__class__ = NarrowConv2d
        elif _winograd_shape(conv):
            conv.__class__ = WinogradConv2d
            conv.prepare()


def _winograd_shape(conv: nn.Conv2d) -> bool:
    square = conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    wide = min(conv.in_channels, conv.out_channels) >= WINOGRAD_CHANNELS
    return square and conv.dilation == (1, 1) and wide


class _MatmulInputGrad(torch.autograd.Function):
    """A frozen convolution whose input gradient is ``Wᵀ·grad`` (one batched matrix product: ``N×(C·k·k)×L``
    columns) folded back onto the ``N×C×H×W`` input (col2im): the same sum as the convolution's own backward, in
    another order. No gradient for the weight or bias."""

    @staticmethod
    def forward(ctx, x, conv: nn.Conv2d):
        ctx.conv, ctx.size = conv, x.shape[-2:]
        return conv._conv_forward(x, conv.weight, conv.bias)

    @staticmethod
    def backward(ctx, grad):
        conv = ctx.conv
        cols = conv.weight.flatten(1).T @ grad.flatten(2)
        return F.fold(cols, ctx.size, conv.kernel_size, conv.dilation, conv.padding, conv.stride), None


class NarrowConv2d(nn.Conv2d):
    """A frozen :class:`nn.Conv2d` on at most :data:`NARROW_CONV` input channels, input gradient by a matrix
    product (module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return _MatmulInputGrad.apply(x, self)


# F(2×2, 3×3): output tile = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A for a 4×4 input tile d and a 3×3 kernel g (Lavin & Gray).
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# G·flip(g) = J·G·g with J the row order (3, 1, 2, 0): the flipped kernel's transform is the kernel's, tiles reordered.
_FLIP = tuple(4 * i + j for i in (3, 1, 2, 0) for j in (3, 1, 2, 0))


def winograd_weights(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``O×C×3×3`` kernel -> its transform ``G g Gᵀ`` for the forward (``16×C×O``, index ``4·row + column``) and
    that of the kernel flipped with its channels swapped, for the input gradient (``16×O×C``); summed in float64 and
    rounded once to ``weight``'s dtype."""
    o, c = weight.shape[:2]
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    flat = weight.detach().double().reshape(o * c, 9).T  # 9×(O·C)
    u = (torch.kron(g, g) @ flat).view(16, o, c).to(weight.dtype)
    return u.transpose(1, 2), u[list(_FLIP)]


def _input_transform(t0: Tensor, t1: Tensor, t2: Tensor, t3: Tensor, out: Tensor) -> None:
    """``Bᵀ`` along one tile axis: the four rows of a 4-tap tile into ``out[0..3]``."""
    torch.sub(t0, t2, out=out[0])
    torch.add(t1, t2, out=out[1])
    torch.sub(t2, t1, out=out[2])
    torch.sub(t1, t3, out=out[3])


def winograd_conv(x: Tensor, u: Tensor, bias: Tensor | None = None) -> Tensor:
    """3×3 convolution, stride 1, zero padding 1, of ``x`` (``N×C×H×W``, H and W even, any memory format) with the
    transformed kernel ``u`` (``16×C×O``, :func:`winograd_weights`) -> ``N×O×H×W`` in channels-last format."""
    n, c, h, w = x.shape
    th, tw, o = h // 2, w // 2, u.shape[2]
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # N×(H+2)×(W+2)×C
    rows = x.new_empty(4, n, th, w + 2, c)  # Bᵀ over the tiles' rows
    _input_transform(*(padded[:, i : i + 2 * th : 2] for i in range(4)), out=rows)
    v = x.new_empty(4, 4, n, th, tw, c)  # Bᵀ d B, then over columns
    for r in range(4):
        _input_transform(*(rows[r][:, :, j : j + 2 * tw : 2] for j in range(4)), out=v[r])
    m = torch.bmm(v.view(16, n * th * tw, c), u).view(4, 4, n, th, tw, o)
    first, second = m[0] + m[1] + m[2], m[1] - m[2] - m[3]  # Aᵀ over rows
    y = torch.empty(n, o, h, w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    tiles = y.permute(0, 2, 3, 1).view(n, th, 2, tw, 2, o)
    for i, s in enumerate((first, second)):  # then A over columns, into each tile's row i
        torch.add(s[0] + s[1], s[2], out=tiles[:, :, i, :, 0])
        torch.sub(s[1] - s[2], s[3], out=tiles[:, :, i, :, 1])
    if bias is not None:
        y += bias.view(1, -1, 1, 1)
    return y


class _WinogradConv(torch.autograd.Function):
    """Forward by Winograd; the input gradient is the convolution of the output gradient with the kernel flipped and
    its channels swapped, itself a 3×3 stride-1 convolution, so by Winograd too. No gradient for the weight or bias."""

    @staticmethod
    def forward(ctx, x, conv: WinogradConv2d):
        ctx.conv = conv
        return winograd_conv(x, conv.winograd_u, conv.bias)

    @staticmethod
    def backward(ctx, grad):
        return winograd_conv(grad, ctx.conv.winograd_u_grad), None


class WinogradConv2d(nn.Conv2d):
    """A frozen 3×3 stride-1 :class:`nn.Conv2d` of :data:`WINOGRAD_CHANNELS` channels or more, by Winograd (module
    docstring) where the image's height and width are even, and by the plain convolution elsewhere. Call
    :meth:`prepare` after the weights change (:func:`speed_up_convs` does)."""

    def prepare(self) -> None:
        """Transform the kernel for the forward and the input gradient (buffers outside the state dict)."""
        forward, grad = winograd_weights(self.weight)
        self.register_buffer("winograd_u", forward, persistent=False)
        self.register_buffer("winograd_u_grad", grad, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            return super().forward(x)
        return _WinogradConv.apply(x, self)
