"""The L2 threat model: agreement with torchattacks' PGDL2, the hand-computed FGM step, bounds and side effects,
budget checks, the registry of default steps, and the threat suite in L2."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchattacks
from torch import nn

from robust import attacks
from robust.attacks import ATTACKS, FGSM_RS_STEP, SINGLE_STEP_ATTACKS, attack_info, default_step, fgsm, pgd
from robust.errors import RobustError
from robust.threats import ThreatSpec, apgd, predictions
from robust.training.module import AdversarialClassifier

EPS = 1.0  # L2, over 3·32·32 values: about 0.018 per value if spread evenly (digits images)


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def l2_dist(a, b):
    return (a - b).flatten(1).norm(dim=1)


@pytest.fixture(scope="module")
def batch(digits_val):
    x, y = digits_val
    return x[:64], y[:64]


def test_pgd_l2_matches_torchattacks_without_random_start(digits_cnn, batch):
    x, y = batch
    ours = pgd(digits_cnn, x, y, EPS, alpha=0.2, steps=7, random_start=False, norm="l2")
    ref = torchattacks.PGDL2(digits_cnn, eps=EPS, alpha=0.2, steps=7, random_start=False)(x, y)
    assert (ours - ref).abs().max().item() <= 1e-6
    assert (l2_dist(ours, x) > 0.5 * EPS).float().mean() > 0.5  # it really moved, most of the way out


def test_targeted_pgd_l2_matches_torchattacks(digits_cnn, batch):
    x, y = batch
    target = attacks.random_other_class(y, 10, generator=torch.Generator().manual_seed(0))
    ours = pgd(digits_cnn, x, target, EPS, alpha=0.2, steps=5, targeted=True, random_start=False, norm="l2")
    atk = torchattacks.PGDL2(digits_cnn, eps=EPS, alpha=0.2, steps=5, random_start=False)
    atk.set_mode_targeted_by_label(quiet=True)
    assert (ours - atk(x, target)).abs().max().item() <= 1e-6


def test_pgd_l2_random_start_is_torchattacks_start(digits_cnn, batch):
    """Same draws in the same order: under one seed the whole random-start attack is torchattacks' own; over
    independent seeds the accuracies agree within sampling noise."""
    x, y = batch
    with torch.random.fork_rng():
        torch.manual_seed(3)
        ours = pgd(digits_cnn, x, y, EPS, alpha=0.2, steps=3, norm="l2")
        torch.manual_seed(3)
        ref = torchattacks.PGDL2(digits_cnn, eps=EPS, alpha=0.2, steps=3)(x, y)
        assert (ours - ref).abs().max().item() <= 1e-6
        acc_ours, acc_ref = [], []
        for seed in range(3):
            torch.manual_seed(seed)
            acc_ours.append(accuracy(digits_cnn, pgd(digits_cnn, x, y, 0.5, 0.125, 3, norm="l2"), y))
            torch.manual_seed(100 + seed)
            acc_ref.append(accuracy(digits_cnn, torchattacks.PGDL2(digits_cnn, 0.5, 0.125, 3)(x, y), y))
    assert abs(sum(acc_ours) / 3 - sum(acc_ref) / 3) <= 0.06, (acc_ours, acc_ref)


def test_l2_attacks_lower_accuracy(digits_cnn, batch):
    x, y = batch
    clean = accuracy(digits_cnn, x, y)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        assert accuracy(digits_cnn, fgsm(digits_cnn, x, y, 0.75, norm="l2"), y) <= clean - 0.3
        steps = 10
        alpha = default_step("pgd", 0.75, norm="l2", steps=steps)
        assert accuracy(digits_cnn, pgd(digits_cnn, x, y, 0.75, alpha, steps, norm="l2"), y) <= 0.1


def linear_model(shape=(2, 4, 4), classes=3, seed=0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    lin = nn.Linear(n, classes).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(classes, n, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(classes, generator=g, dtype=torch.float64))
    return nn.Sequential(nn.Flatten(), lin)


@pytest.mark.parametrize("targeted", [False, True])
def test_fgm_is_one_normalized_gradient_step_then_projection(targeted):
    model = linear_model()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 2, 4, 4, generator=g, dtype=torch.float64) * 0.6 + 0.2  # room to move: no clamp
    y = torch.randint(0, 3, (6,), generator=g)
    eps = 0.3
    lin = model[1]
    p = torch.softmax(x.flatten(1) @ lin.weight.T + lin.bias, dim=1)
    grad = ((p - nn.functional.one_hot(y, 3).double()) @ lin.weight).view_as(x)
    direction = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expected = x + eps * (-direction if targeted else direction)
    ours = fgsm(model, x, y, eps, norm="l2", targeted=targeted)
    assert (ours - expected).abs().max().item() <= 1e-9
    assert l2_dist(ours, x).sub(eps).abs().max().item() <= 1e-9  # the whole budget, exactly
    # a step longer than eps is projected back onto the ball
    long = fgsm(model, x, y, eps, alpha=3 * eps, norm="l2", targeted=targeted)
    assert (long - expected).abs().max().item() <= 1e-9


@pytest.mark.parametrize(
    "attack",
    [
        lambda m, x, y: fgsm(m, x, y, EPS, norm="l2"),
        lambda m, x, y: fgsm(m, x, y, EPS, random_start=True, norm="l2"),
        lambda m, x, y: fgsm(m, x, y, EPS, alpha=5 * EPS, norm="l2", targeted=True),
        lambda m, x, y: pgd(m, x, y, EPS, 0.5, 3, norm="l2"),
        lambda m, x, y: pgd(m, x, y, EPS, 0.5, 3, norm="l2", restarts=2),
        lambda m, x, y: pgd(m, x, y, EPS, 0.5, 3, norm="l2", random_start=False),
        lambda m, x, y: apgd(m, x, y, EPS, 3, norm="l2"),
    ],
    ids=["fgm", "fgm_rs", "fgm_long_targeted", "pgd", "pgd_restarts", "pgd_no_start", "apgd"],
)
def test_l2_bounds_and_no_side_effects(digits_cnn, batch, attack):
    model = copy.deepcopy(digits_cnn)  # train mode moves BatchNorm statistics: not the shared model's
    x, y = batch[0][:8], batch[1][:8]
    x_before = x.clone()
    next(model.parameters()).requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    for mode in (True, False):
        model.train(mode)
        x_adv = attack(model, x, y)
        assert [m.training for m in model.modules()] == [mode] * len(list(model.modules()))
        assert not x_adv.requires_grad and x_adv.grad_fn is None and x_adv.shape == x.shape
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert l2_dist(x_adv, x).max().item() <= EPS + 1e-6
        assert torch.equal(x, x_before)
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())


def test_l2_early_exit_stays_in_the_ball(digits_cnn, batch):
    x, y = batch
    with torch.random.fork_rng():
        for made in (
            pgd(digits_cnn, x, y, EPS, 0.5, 3, norm="l2", early_exit=True, restarts=2),
            attacks.apgd(digits_cnn, x, y, EPS, 3, norm="l2", early_exit=True),
        ):
            assert l2_dist(made, x).max().item() <= EPS + 1e-6 and made.min() >= 0 and made.max() <= 1


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: fgsm(m, x, y, -0.1, norm="l2"),
        lambda m, x, y: fgsm(m, x, y, 56.0, norm="l2"),  # sqrt(3·32·32) = 55.4
        lambda m, x, y: pgd(m, x, y, -1.0, 0.1, 3, norm="l2"),
        lambda m, x, y: pgd(m, x, y, 60.0, 0.1, 3, norm="l2"),
        lambda m, x, y: pgd(m, x, y, 1.0, 0.0, 3, norm="l2"),
        lambda m, x, y: pgd(m, x, y, float("nan"), 0.1, 3, norm="l2"),
        lambda m, x, y: pgd(m, x, y, 0.1, 0.01, 3, norm="l1"),
        lambda m, x, y: apgd(m, x, y, 60.0, 3, norm="l2"),
        lambda m, x, y: ThreatSpec(-0.5, norm="l2"),
        lambda m, x, y: ThreatSpec(0.5, norm="L2"),
    ],
    ids=[
        "fgm_eps<0",
        "fgm_eps>diameter",
        "pgd_eps<0",
        "pgd_eps>diameter",
        "alpha0",
        "nan",
        "norm_l1",
        "apgd_eps>diameter",
        "spec_eps<0",
        "spec_norm",
    ],
)
def test_bad_l2_budget_is_one_clear_line(digits_cnn, batch, call):
    with pytest.raises(RobustError) as info:
        call(digits_cnn, *batch)
    assert "\n" not in str(info.value)


def test_l2_eps_up_to_the_diameter_is_accepted_and_linf_stays_in_unit_range(digits_cnn, batch):
    x, y = batch[0][:2], batch[1][:2]
    diameter = math.sqrt(x[0].numel())
    assert l2_dist(fgsm(digits_cnn, x, y, diameter, norm="l2"), x).max() <= diameter + 1e-4
    assert ThreatSpec(3.0, norm="l2").eps == 3.0  # ImageNet-sized L2 budgets are above 1
    with pytest.raises(RobustError, match=r"eps must be in \[0, 1\]"):
        ThreatSpec(3.0)


def test_registry_is_the_one_home_of_default_steps():
    eps = 0.1
    assert default_step("fgsm", eps, training=True) == pytest.approx(eps)
    assert default_step("fgsm_rs", eps, training=True) == pytest.approx(1.25 * eps) == FGSM_RS_STEP * eps
    assert default_step("nfgsm", eps, training=True) == pytest.approx(eps)
    assert default_step("pgd", eps, training=True) == default_step("pgd", eps) == pytest.approx(eps / 4)
    assert default_step("pgd", 0.5, norm="l2", steps=10) == pytest.approx(2.5 * 0.5 / 10)
    assert default_step("pgd", 0.0) == pytest.approx(1 / 255)  # a step must be > 0; it is void at eps 0
    assert SINGLE_STEP_ATTACKS == ("fgsm", "fgsm_rs", "nfgsm")
    assert [n for n, a in ATTACKS.items() if not a.projects] == ["nfgsm"]
    # the threat suite's and the module's defaults derive from it
    assert ThreatSpec(eps).step == default_step("pgd", eps)
    assert ThreatSpec(0.5, norm="l2", steps=20).step == pytest.approx(2.5 * 0.5 / 20)
    assert all(
        AdversarialClassifier.default_alpha(a, "ce", eps) == default_step(a, eps, training=True) for a in ATTACKS
    )
    assert ThreatSpec(0.5, norm="l2", steps=5).step == pytest.approx(0.25)
    with pytest.raises(RobustError, match="training perturbation"):
        default_step("nfgsm", eps)
    with pytest.raises(RobustError, match="no l2 version"):
        default_step("nfgsm", eps, norm="l2", training=True)
    with pytest.raises(RobustError, match="unknown attack"):
        attack_info("cw")


def test_threat_suite_in_l2(digits_cnn, batch):
    x, y = batch[0][:24], batch[1][:24]
    keys = ("clean", "fgsm", "pgd", "apgd", "pgd_worst", "bpda_pgd", "targeted_success")
    spec = ThreatSpec(2.0, steps=5, norm="l2", threats=keys)
    preds = predictions(digits_cnn, x, y, spec)
    acc = {k: (preds[k] == y).float().mean().item() for k in keys if k != "targeted_success"}
    assert acc["clean"] > 0.85
    assert acc["pgd"] < acc["clean"] - 0.3 and acc["apgd"] < acc["clean"] - 0.3 and acc["bpda_pgd"] < acc["clean"]
    assert acc["pgd_worst"] <= min(acc["fgsm"], acc["pgd"], acc["apgd"])
    with torch.random.fork_rng():
        made = apgd(digits_cnn, x, y, 2.0, 5, norm="l2")
    assert l2_dist(made, x).max() <= 2.0 + 1e-4 and 0 <= made.min() and made.max() <= 1
