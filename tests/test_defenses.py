"""JPEG defense: same pixels as PIL, restores accuracy, straight-through gradient, clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from robust.attacks import pgd
from robust.data.modules import ImageFolder
from robust.defenses import JpegDefended, bpda_jpeg, jpeg, to_uint8
from robust.errors import RobustError


def pil_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """The seed tutorial's per-image PIL save/load loop, on the same uint8 pixels."""
    out = []
    for img in to_uint8(x):
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())))).permute(2, 0, 1))
    return torch.stack(out).float() / 255


@pytest.fixture(scope="module")
def cifar_batch(shared_data):
    dm = ImageFolder(root=str(shared_data / "cifar10-subset"), batch_size=64, num_workers=0, augment=False)
    x, _ = next(iter(dm.val_dataloader()))
    return x


@pytest.mark.parametrize("quality", [20, 75, 95])
def test_jpeg_matches_pil_pixels(cifar_batch, quality):
    ours = jpeg(cifar_batch, quality)
    assert ours.shape == cifar_batch.shape and ours.dtype == cifar_batch.dtype
    assert torch.equal(to_uint8(ours), to_uint8(pil_jpeg(cifar_batch, quality)))
    assert 0 < (ours - cifar_batch).abs().mean() < 0.1  # lossy, but the picture survives


@pytest.mark.parametrize("threads", [1, 3])
def test_jpeg_same_pixels_on_any_number_of_threads(cifar_batch, threads):
    """The CPU codec runs in ``torch.get_num_threads()`` worker threads; the split must not change a pixel.
    (conftest.py gives the suite's thread count back after the test.)"""
    torch.set_num_threads(threads)
    ours = jpeg(cifar_batch[:7], 75)
    assert torch.equal(to_uint8(ours), to_uint8(pil_jpeg(cifar_batch[:7], 75)))


def test_jpeg_greyscale_and_empty_batch():
    grey = torch.rand(2, 1, 16, 16)
    assert jpeg(grey).shape == grey.shape
    assert jpeg(torch.rand(0, 3, 8, 8)).shape == (0, 3, 8, 8)


@pytest.mark.parametrize("quality", [0, 101, 50.5, True])
def test_bad_quality_is_a_clear_error(quality):
    with pytest.raises(RobustError, match="quality"):
        jpeg(torch.rand(1, 3, 8, 8), quality)


def test_bad_shape_is_a_clear_error():
    with pytest.raises(RobustError, match="N×C×H×W"):
        jpeg(torch.rand(3, 8, 8))


def test_bpda_is_jpeg_forward_identity_backward():
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    w = torch.randn(4, 3, 16, 16)
    out = bpda_jpeg(x, 60)
    assert torch.equal(out.detach(), jpeg(x.detach(), 60))
    (out * w).sum().backward()
    assert torch.equal(x.grad, w)


def test_jpeg_restores_accuracy_on_clean_images(digits_cnn, digits_val):
    x, y = digits_val
    with torch.no_grad():
        clean = (digits_cnn(x).argmax(1) == y).float().mean().item()
        defended = (digits_cnn(jpeg(x)).argmax(1) == y).float().mean().item()
    assert abs(clean - defended) <= 0.03


def test_jpeg_defends_transferred_pgd_but_not_adaptive_bpda(digits_cnn, digits_val):
    """PGD made on the bare model largely fails after JPEG; PGD through the straight-through JPEG does better.

    (Measured on the digits CNN, 64 images, PGD-10 at eps 0.05: bare 0%, JPEG of transferred PGD ~69%, JPEG of BPDA
    PGD ~48%.)
    """
    x, y = digits_val[0][:64], digits_val[1][:64]
    eps = 0.05
    torch.manual_seed(0)
    x_adv = pgd(digits_cnn, x, y, eps, eps / 4, 10)
    adaptive = pgd(JpegDefended(digits_cnn, straight_through=True), x, y, eps, eps / 4, 10)
    with torch.no_grad():
        acc = lambda z: (digits_cnn(z).argmax(1) == y).float().mean().item()  # noqa: E731
        bare, transferred, bpda = acc(x_adv), acc(jpeg(x_adv)), acc(jpeg(adaptive))
    assert transferred >= bare + 0.2  # JPEG really defends against the transferred attack
    assert bpda <= transferred - 0.05  # and the adaptive attacker gets through much more often
