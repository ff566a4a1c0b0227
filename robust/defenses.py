"""JPEG re-encoding as an input defense, on whole batches through ``torchvision.io``.

Images are ``N×C×H×W`` floats in [0, 1] (C = 1 or 3). On CUDA tensors the codec is nvjpeg (one batched
call); elsewhere the CPU codec, split across ``torch.get_num_threads()`` threads (torchvision's codec releases
the GIL; how much a second thread gains depends on the machine, see the README's benchmarks). ``jpeg`` is not
differentiable; ``bpda_jpeg`` is the straight-through version (forward = JPEG, backward = identity) that lets an
adaptive attacker run PGD *through* the defense (BPDA, Athalye et al. 2018).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from robust.checks import check_quality
from robust.errors import RobustError


def to_uint8(x: Tensor) -> Tensor:
    """[0, 1] float images -> uint8 images in 0..255 (round to nearest grey level)."""
    return (x.detach().clamp(0, 1) * 255).round_().to(torch.uint8)


@torch.no_grad()
def jpeg(x: Tensor, quality: int = 75) -> Tensor:
    """JPEG encode + decode every image of a batch. ``N×C×H×W`` [0, 1] -> same shape, dtype, device."""
    check_quality(quality)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise RobustError(f"JPEG needs a batch N×C×H×W with C = 1 or 3, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        return x.clone()
    if x.device.type == "cuda":
        encoded = encode_jpeg(list(to_uint8(x)), quality=int(quality))
        decoded = decode_jpeg([e.cpu() for e in encoded], mode=ImageReadMode.UNCHANGED, device=x.device)
        return torch.stack(decoded).to(x.dtype).div_(255)
    workers = min(torch.get_num_threads(), len(x))
    if workers <= 1:
        return _cpu_jpeg(x.cpu(), int(quality)).to(x.device)
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(_cpu_jpeg, x.cpu().tensor_split(workers), [int(quality)] * workers))
    return torch.cat(parts).to(x.device)


def _cpu_jpeg(x: Tensor, quality: int) -> Tensor:
    """JPEG of a CPU batch, image by image; runs in a worker thread (torchvision's codec releases the GIL)."""
    decoded = decode_jpeg(encode_jpeg(list(to_uint8(x)), quality=quality), mode=ImageReadMode.UNCHANGED)
    return torch.stack(decoded).to(x.dtype).div_(255)


class _StraightThroughJpeg(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, quality: int) -> Tensor:  # noqa: ARG004
        return jpeg(x, quality)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # noqa: ARG004
        return grad_output, None


def bpda_jpeg(x: Tensor, quality: int = 75) -> Tensor:
    """JPEG in the forward pass, identity in the backward pass (straight-through / BPDA)."""
    check_quality(quality)
    return _StraightThroughJpeg.apply(x, int(quality))


class JpegDefended(torch.nn.Module):
    """``model(jpeg(x))`` as a module; with ``straight_through=True`` gradients pass through (BPDA)."""

    def __init__(self, model: torch.nn.Module, quality: int = 75, straight_through: bool = False) -> None:
        super().__init__()
        check_quality(quality)
        self.model, self.quality, self.straight_through = model, int(quality), straight_through

    def forward(self, x: Tensor) -> Tensor:
        x = bpda_jpeg(x, self.quality) if self.straight_through else jpeg(x, self.quality)
        return self.model(x)
