"""Attacks on the trained digits CNN: agreement with torchattacks, real effect (against a noise control), bounds
and side effects."""

from __future__ import annotations

import copy

import pytest
import torch
import torchattacks
from torch import nn

from robust.attacks import (
    apgd,
    fgsm,
    fixed_class,
    least_likely_class,
    nfgsm,
    pgd,
    random_other_class,
    resolve_class,
)
from robust.errors import RobustError
from robust.objectives import mart_pgd, trades_pgd

EPS = 0.1  # digits: about 25 grey levels


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def batch(digits_val):
    x, y = digits_val
    return x[:64], y[:64]


def test_fgsm_matches_torchattacks(digits_cnn, batch):
    x, y = batch
    ours = fgsm(digits_cnn, x, y, EPS)
    ref = torchattacks.FGSM(digits_cnn, eps=EPS)(x, y)
    assert (ours - ref).abs().max().item() <= 1e-6
    assert (ours != x).float().mean() > 0.5  # it really moved


def test_pgd_matches_torchattacks(digits_cnn, batch):
    x, y = batch
    ours = pgd(digits_cnn, x, y, EPS, alpha=EPS / 4, steps=7, random_start=False)
    ref = torchattacks.PGD(digits_cnn, eps=EPS, alpha=EPS / 4, steps=7, random_start=False)(x, y)
    assert (ours - ref).abs().max().item() <= 1e-6


def test_targeted_pgd_matches_torchattacks_and_reaches_target(digits_cnn, batch):
    x, y = batch
    target = random_other_class(y, 10, generator=torch.Generator().manual_seed(0))
    ours = pgd(digits_cnn, x, target, EPS, alpha=EPS / 4, steps=10, targeted=True, random_start=False)
    atk = torchattacks.PGD(digits_cnn, eps=EPS, alpha=EPS / 4, steps=10, random_start=False)
    atk.set_mode_targeted_by_label(quiet=True)
    assert (ours - atk(x, target)).abs().max().item() <= 1e-6
    with torch.no_grad():
        reached = (digits_cnn(ours).argmax(1) == target).float().mean().item()
    assert reached >= 0.8, reached


@pytest.mark.parametrize(
    ("norm", "eps", "loss", "targets"),
    [("linf", 0.01, "ce", 0), ("linf", 0.01, "dlr", 0), ("l2", 0.3, "ce", 0), ("linf", 0.01, "dlr", 1)],
    ids=["ce", "dlr", "ce_l2", "apgd_t"],
)
def test_apgd_matches_torchattacks(digits_cnn, batch, norm, eps, loss, targets):
    """Our per-example APGD is torchattacks' arithmetic: with every example correct to start with (torchattacks then
    draws its start for the whole batch, as we do) and the same seed, the same images. APGD-T with one target is
    torchattacks' APGDT with n_classes=2 (its targets are the classes ranked 2..n_classes)."""
    x, y = batch
    with torch.no_grad():
        keep = digits_cnn(x).argmax(1) == y
    x, y = x[keep][:32], y[keep][:32]
    ta_norm = {"linf": "Linf", "l2": "L2"}[norm]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ours = apgd(digits_cnn, x, y, eps, 10, norm=norm, loss=loss, targets=targets)
        torch.manual_seed(0)
        early = apgd(digits_cnn, x, y, eps, 10, norm=norm, loss=loss, targets=targets, early_exit=True)
        if targets:
            ref = torchattacks.APGDT(digits_cnn, norm=ta_norm, eps=eps, steps=10, n_classes=targets + 1, seed=0)(x, y)
        else:
            ref = torchattacks.APGD(digits_cnn, norm=ta_norm, eps=eps, steps=10, loss=loss, seed=0)(x, y)
    assert (ours - ref).abs().max().item() <= 1e-6
    with torch.no_grad():
        fooled, fooled_early = digits_cnn(ours).argmax(1) != y, digits_cnn(early).argmax(1) != y
    assert torch.equal(fooled, fooled_early) and 0 < fooled.sum() < len(y)  # early exit: same verdicts


def test_attacks_lower_accuracy_by_a_large_margin(digits_cnn, batch):
    x, y = batch  # 64 of the 360: clean ~0.97; at eps 0.03 (8 grey levels) FGSM ~0.05, PGD-10 0.0
    eps = 0.03
    clean = accuracy(digits_cnn, x, y)
    assert clean >= 0.9
    torch.manual_seed(0)
    assert accuracy(digits_cnn, fgsm(digits_cnn, x, y, eps), y) <= clean - 0.4
    assert accuracy(digits_cnn, fgsm(digits_cnn, x, y, eps, random_start=True), y) <= clean - 0.4
    assert accuracy(digits_cnn, pgd(digits_cnn, x, y, eps, alpha=eps / 4, steps=10), y) <= 0.1
    noise = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 * eps - eps
    assert accuracy(digits_cnn, (x + noise).clamp(0, 1), y) >= clean - 0.1  # the gradient, not the budget, fools it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "attack",
    [
        lambda m, x, y: fgsm(m, x, y, EPS),
        lambda m, x, y: fgsm(m, x, y, EPS, random_start=True),
        lambda m, x, y: fgsm(m, x, y, EPS, targeted=True),
        lambda m, x, y: pgd(m, x, y, EPS, EPS / 4, 3),
        lambda m, x, y: pgd(m, x, y, EPS, EPS / 4, 3, restarts=2),
        lambda m, x, y: apgd(m, x, y, EPS, 3),
        lambda m, x, y: apgd(m, x, y, EPS, 3, loss="dlr", restarts=2),
        lambda m, x, y: nfgsm(m, x, y, EPS / 3),  # its bound noise·eps + alpha is EPS here
        lambda m, x, y: trades_pgd(m, x, EPS, EPS / 4, 1),
        lambda m, x, y: mart_pgd(m, x, y, EPS, EPS / 4, 1),
    ],
    ids=[
        "fgsm",
        "fgsm_rs",
        "fgsm_targeted",
        "pgd",
        "pgd_restarts",
        "apgd",
        "apgd_dlr",
        "nfgsm",
        "trades_pgd",
        "mart_pgd",
    ],
)
def test_bounds_dtype_device_and_no_side_effects(digits_cnn, batch, attack, dtype):
    model = copy.deepcopy(digits_cnn).to(dtype)  # train mode moves BatchNorm statistics: not the shared model's
    x, y = batch[0][:8].to(dtype), batch[1][:8]  # per-image properties: 8 images suffice (float64 convs are slow)
    x_before = x.clone()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    for mode in (True, False):
        model.train(mode)
        bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        stats = bn.running_mean.clone()
        x_adv = attack(model, x, y)
        assert [m.training for m in model.modules()] == [mode] * len(list(model.modules()))
        if not mode:
            assert torch.equal(bn.running_mean, stats)
        assert x_adv.dtype == dtype and x_adv.device == x.device and x_adv.shape == x.shape
        assert not x_adv.requires_grad and x_adv.grad_fn is None
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv - x).abs().max().item() <= EPS + 1e-6
        assert torch.equal(x, x_before)
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: fgsm(m, x, y, -0.1),
        lambda m, x, y: fgsm(m, x, y, 1.5),
        lambda m, x, y: pgd(m, x, y, 0.1, 0.01, 0),
        lambda m, x, y: pgd(m, x, y, 0.1, 0.0, 5),
        lambda m, x, y: pgd(m, x, y, 0.1, 0.01, 5, restarts=0),
        lambda m, x, y: fgsm(m, x[0], y, 0.1),
        lambda m, x, y: fgsm(m, x, y[:3], 0.1),
        lambda m, x, y: nfgsm(m, x, y, 0.1, noise=-1.0),
        lambda m, x, y: nfgsm(m, x, y, 0.1, alpha=0.0),
        lambda m, x, y: apgd(m, x, y, 0.1, 5, loss="cw"),
        lambda m, x, y: apgd(m, x, y, 0.1, 5, targets=10),
        lambda m, x, y: pgd(m, x, y, 0.1, 0.01, 5, active=torch.ones(3, dtype=torch.bool)),
    ],
    ids=[
        "eps<0",
        "eps>1",
        "steps0",
        "alpha0",
        "restarts0",
        "not4d",
        "label_shape",
        "nfgsm_noise<0",
        "nfgsm_alpha0",
        "apgd_loss",
        "apgd_targets",
        "active_shape",
    ],
)
def test_bad_budget_or_shape_is_a_clear_error(digits_cnn, batch, call):
    with pytest.raises(RobustError):
        call(digits_cnn, *batch)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: pgd(m, x, y, EPS, EPS / 4, 2, early_exit=True),
        lambda m, x, y: apgd(m, x, y, EPS, 2, early_exit=True),
    ],
    ids=["pgd", "apgd"],
)
def test_early_exit_refuses_train_mode(digits_cnn, batch, call):
    digits_cnn.train()
    try:
        with pytest.raises(RobustError, match="eval mode"):
            call(digits_cnn, *batch)
    finally:
        digits_cnn.eval()


def test_target_helpers(digits_cnn, batch):
    x, y = batch
    other = random_other_class(y, 10)
    assert (other != y).all() and other.min() >= 0 and other.max() < 10
    ll = least_likely_class(digits_cnn, x)
    with torch.no_grad():
        assert torch.equal(ll, digits_cnn(x).argmin(1))
    assert (fixed_class(y, 3, 10) == 3).all()
    with pytest.raises(RobustError, match="out of range"):
        fixed_class(y, 10, 10)


def test_resolve_class_names_ids_and_suggestions():
    names = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
    assert resolve_class("goldfish", names) == 1
    assert resolve_class("Great White Shark", names) == 2
    assert resolve_class(0, names) == 0
    assert resolve_class("2", names) == 2
    with pytest.raises(RobustError, match="out of range"):
        resolve_class(3, names)
    with pytest.raises(RobustError, match="did you mean 'great white shark'"):
        resolve_class("great white shak", names)


# ---- N-FGSM: the official semantics, computed by hand on a linear model ------------------------------


def linear_model(shape=(2, 4, 4), classes=3, seed=0) -> nn.Module:
    """Flatten + Linear in float64 with fixed random weights: its CE input gradient is known in closed form."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1] * shape[2]
    lin = nn.Linear(n, classes).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(classes, n, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(classes, generator=g, dtype=torch.float64))
    return nn.Sequential(nn.Flatten(), lin)


def hand_batch(n=6, shape=(2, 4, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g, dtype=torch.float64)
    x[0], x[1] = 0.0, 1.0  # all-black and all-white images: the [0, 1] clamps must bite
    return x, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("targeted", [False, True])
def test_nfgsm_matches_the_official_update_by_hand(targeted):
    model, (x, y) = linear_model(), hand_batch()
    eps, k, alpha = 0.1, 2.0, 0.07
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(7)
    x_adv = nfgsm(model, x, y, eps, noise=k, alpha=alpha, targeted=targeted)
    assert len(calls) == 1  # one forward, hence one input gradient

    # pdejorge/N-FGSM train.py: eta ~ U(-k·eps, k·eps) kept inside [0, 1]; delta = eta + alpha·sign(grad) kept
    # inside [0, 1]; no clip to the eps ball (--clip -1 by default).
    torch.manual_seed(7)
    eta = torch.empty_like(x).uniform_(-k * eps, k * eps)
    start = (x + eta).clamp(0, 1)
    lin = model[1]
    p = torch.softmax(start.flatten(1) @ lin.weight.T + lin.bias, dim=1)
    grad = ((p - nn.functional.one_hot(y, 3).double()) @ lin.weight).view_as(x)  # d CE / d input, up to 1/N
    direction = -grad.sign() if targeted else grad.sign()
    expected = (start + alpha * direction).clamp(0, 1)
    assert ((x + eta) < 0).any() and ((x + eta) > 1).any()  # the clamps really did something
    assert (x_adv - expected).abs().max().item() <= 1e-12
    assert not x_adv.requires_grad and x_adv.grad_fn is None


def test_nfgsm_noise_range_leaves_the_eps_ball_by_design():
    model = linear_model()
    x = torch.full((256, 2, 4, 4), 0.5, dtype=torch.float64)  # far from 0 and 1: no clamp
    y = torch.zeros(256, dtype=torch.long)
    eps, k, alpha = 0.1, 2.0, 0.01
    torch.manual_seed(0)
    dist = (nfgsm(model, x, y, eps, noise=k, alpha=alpha) - x).abs()
    assert dist.max().item() <= k * eps + alpha + 1e-12
    assert dist.max().item() >= k * eps + alpha - 0.02  # the whole noise range is used
    # U(-2eps, 2eps) lands outside the eps ball half of the time, and nothing projects it back
    outside = (dist > eps + alpha).double().mean().item()
    assert 0.4 <= outside <= 0.55, outside


def test_nfgsm_without_noise_is_plain_fgsm():
    model, (x, y) = linear_model(), hand_batch()
    assert (nfgsm(model, x, y, 0.1, noise=0.0) - fgsm(model, x, y, 0.1)).abs().max().item() <= 1e-12
