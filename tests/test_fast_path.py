"""The inference fast path (robust/fast_path.py): the user's model untouched, BatchNorm folded, and the same figures
as the plain path for every threat key, within what float rounding can move.

The bound, and why. Folding computes ``w·(x - μ)/σ + b`` as ``(w/σ)·x + (b - w·μ/σ)``, and channels-last changes the
order in which a convolution sums, as Winograd's F(2×2, 3×3) does in ResNet18's wide layers: float32 rounding then moves
logits by a few ulps per layer (1.6e-6 measured on a ResNet18, 1.8e-6 with Winograd), far below ``LOGIT_BOUND`` = 1e-4.
So a clean prediction can differ only where the top-2 logit margin is below the bound. An attack's images can part only
where a gradient component is within rounding of zero and its sign flips (L-inf), which moves that pixel by one step;
that changes a verdict only for an example that sits on its decision boundary after the attack, so per threat at most
``FLIPS`` of the batch's predictions may differ, and on every model here none did. A ReLU whose input is within rounding
of zero may switch between the paths and move an image's input gradient by that unit's share: gradients are compared by
direction (``GRAD_COSINE``). (``mnist_net`` has no BatchNorm and keeps its layout; its stem's input gradient is summed
in another order, by a matrix product.)
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from robust.errors import RobustError
from robust.evaluation.report import evaluate
from robust.fast_path import fast_model, prefers_channels_last
from robust.models.archs import mnist_net
from robust.models.build import CIFAR10_MEAN, CIFAR10_STD, CardedModel, build_model, normalized
from robust.threats import DEFAULT_THREATS, ThreatSpec, predictions

LOGIT_BOUND = 1e-4
GRAD_COSINE = 0.9999  # per example, input gradients of the two paths (test_logits_within_the_rounding_bound)
FLIPS = 1  # per threat and batch: examples left on a decision boundary by an attack whose images parted (docstring)
EVERY_THREAT = (*DEFAULT_THREATS, "square", "autoattack", "aa_worst")


@functools.cache
def _bn_resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, mean=CIFAR10_MEAN, std=CIFAR10_STD, cifar_stem=True).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, 3, 16, 16))  # statistics of its own; their image size does not matter
    return model.state_dict()


def bn_resnet18() -> nn.Module:
    """A CIFAR-stem ResNet18 with random weights and BatchNorm statistics of its own (not the identity), eval mode; a
    new object each call, the same values (built once)."""
    model = build_model("resnet18", 10, mean=CIFAR10_MEAN, std=CIFAR10_STD, cifar_stem=True)
    model.load_state_dict(_bn_resnet18_state())
    return model.eval()


def small_mnist_net() -> nn.Module:
    torch.manual_seed(0)
    return normalized(mnist_net(), (0.1307,), (0.3081,)).eval()


def own_labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's clean predictions: on an untrained model every example then starts correct and is attacked."""
    with torch.no_grad():
        return model(x).argmax(1)


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_user_model_is_untouched_and_batchnorm_is_folded():
    model = bn_resnet18()
    before, flags = state(model), [p.requires_grad for p in model.parameters()]
    fast = fast_model(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # every ResNet BatchNorm follows a conv
    assert not any(p.requires_grad for p in fast.parameters()) and not fast.training
    assert model.backbone.conv1.weight.is_contiguous()  # the layout changed on the copy only
    assert type(model.backbone.conv1) is nn.Conv2d  # and the stem's input gradient
    assert prefers_channels_last(model) and not prefers_channels_last(small_mnist_net())


def test_a_carded_model_keeps_its_card_and_its_checks():
    """A CardedModel cannot be traced (its forward checks the channels): its layers are folded inside, and the copy
    keeps the card and the check."""
    inner = bn_resnet18()
    card = type("Card", (), {"channels": 3, "num_classes": 10})()
    fast = fast_model(CardedModel(inner, card))
    assert isinstance(fast, CardedModel) and fast.card is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    with pytest.raises(RobustError, match="channel"):
        fast(torch.rand(1, 1, 32, 32))


@pytest.mark.parametrize("build", [bn_resnet18, small_mnist_net], ids=["resnet18", "mnist_net"])
def test_logits_within_the_rounding_bound(build):
    model = build()
    size, channels = (28, 1) if build is small_mnist_net else (32, 3)
    x = torch.rand(8, channels, size, size, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    plain, fast = model(x), fast_model(model)(x)
    assert (plain - fast).abs().max() <= LOGIT_BOUND
    grads = [torch.autograd.grad(out.logsumexp(1).sum(), x)[0].flatten(1) for out in (plain, fast)]
    # By direction, not element by element: a ReLU whose input is within rounding of zero may switch, which moves the
    # gradient by that unit's share alone (under AVX2 one of these 8 images: 2e-4 on a 0.04 scale, cosine 0.999998).
    assert torch.nn.functional.cosine_similarity(*grads, dim=1).min() >= GRAD_COSINE
    assert (grads[0].sign() == grads[1].sign()).float().mean() >= 0.99  # what an L-inf step takes


def assert_same_figures(model, x, y, spec):
    """Every threat's predictions of the plain path and the fast path on ``x``: equal where no rounding can move
    them (module docstring)."""
    plain, fast = predictions(model, x, y, spec), predictions(fast_model(model), x, y, spec)
    with torch.no_grad():
        top2 = model(x).topk(2, 1).values
    tie = (top2[:, 0] - top2[:, 1]) < LOGIT_BOUND
    for key in spec.threats:
        differ = plain[key] != fast[key]
        if key in ("clean", "jpeg"):
            assert not (differ & ~tie).any(), key  # jpeg: the same uint8 images through the same model
        else:
            assert int(differ.sum()) <= FLIPS, (key, int(differ.sum()))


def test_every_threat_on_the_digits_model(digits_cnn, digits_val):
    x, y = digits_val[0][:8], digits_val[1][:8]
    spec = ThreatSpec(0.03, steps=3, threats=EVERY_THREAT, square_queries=20)
    assert_same_figures(digits_cnn, x, y, spec)


@pytest.mark.parametrize("build", [bn_resnet18, small_mnist_net], ids=["resnet18", "mnist_net"])
def test_every_default_threat_on_resnet18_and_mnist_net(build):
    model = build()
    size, channels = (28, 1) if build is small_mnist_net else (8, 3)  # 8×8: a sixteenth of ResNet18's CIFAR cost
    x = torch.rand(8, channels, size, size, generator=torch.Generator().manual_seed(2))
    # Square queries forwards only, which test_logits_within_the_rounding_bound bounds; on the ResNet18 it would cost
    # 1.3 s a path in torchattacks' per-query loop: with mnist_net and the digits model only.
    extra = ("square",) if build is small_mnist_net else ()
    spec = ThreatSpec(2 / 255, steps=2, threats=(*DEFAULT_THREATS, *extra), square_queries=20)
    assert_same_figures(model, x, own_labels(model, x), spec)


def test_the_report_records_the_path_and_gives_the_same_figures(digits_cnn, digits_val):
    batches = [(digits_val[0][:16], digits_val[1][:16])]
    kwargs = {"steps": 2, "threats": ("clean", "pgd", "apgd"), "progress": False}
    fast, plain = (evaluate(digits_cnn, batches, [0.015], fast_path=f, **kwargs) for f in (True, False))
    assert fast["fast_path"] and not plain["fast_path"]
    for key in kwargs["threats"]:
        assert abs(fast["rows"][0][key] - plain["rows"][0][key]) * fast["n"] <= FLIPS, key


def test_validation_attacks_one_frozen_copy_per_epoch_that_is_no_submodule():
    """Validation's threat suite runs on the epoch's fast-path copy: built once at the first batch, frozen, a
    different object from the network, not a submodule (so no checkpoint or DDP sees it), and rebuilt next epoch."""
    from robust.training.module import AdversarialClassifier

    module = AdversarialClassifier(arch="resnet18", cifar_stem=True, eps=0.05)
    keys = set(module.state_dict())
    module.on_validation_epoch_start()
    copy = module._frozen_copy()
    assert copy is module._frozen_copy() and copy is not module.model
    assert not any(p.requires_grad for p in copy.parameters()) and not copy.training
    assert all(copy is not m for m in module.modules()) and set(module.state_dict()) == keys
    assert not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())  # folded
    module.on_validation_epoch_start()
    assert module._frozen_copy() is not copy
