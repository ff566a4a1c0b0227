"""Training objectives: each loss against its paper's formula written out here, the objectives' own attacks on a
small real digits model, the attack dispatch and the refused combinations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust.attacks import fgsm, nfgsm, pgd
from robust.data.digits import digits_tensors
from robust.errors import RobustError
from robust.objectives import (
    OBJECTIVES,
    TRAIN_ATTACKS,
    check_objective,
    mart_loss,
    mart_pgd,
    objective_loss,
    trades_loss,
    trades_pgd,
    training_attack,
)

EPS = 0.1


@pytest.fixture(scope="module")
def small_model() -> nn.Module:
    """A small conv net with BatchNorm trained for a few seconds on the 16×16 digits (about 90% accuracy)."""
    torch.manual_seed(0)
    x, y = digits_tensors(16)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # fresh BatchNorm running statistics of the final weights (the weights moved fast)
        for bn in (model[1], model[5]):
            bn.reset_running_stats()
            bn.momentum = None
        model(x)
    return model.eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_tensors(16)
    return x[-64:], y[-64:]


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed float64 clean and adversarial logits (``8×5``) and labels, with the adversarial top class equal to the
    label for some rows and not for others (both branches of MART's runner-up class)."""
    g = torch.Generator().manual_seed(3)
    clean = 2 * torch.randn(8, 5, generator=g, dtype=torch.float64)
    adv = 2 * torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (8,), generator=g)
    adv[:3, :] -= 10 * F.one_hot(y[:3], 5)
    adv[3:6, :] += 10 * F.one_hot(y[3:6], 5)
    return clean.requires_grad_(True), adv.requires_grad_(True), y


def assert_same_value_and_gradients(ours: torch.Tensor, paper: torch.Tensor, inputs, tol: float = 1e-10) -> None:
    assert abs(ours.item() - paper.item()) <= tol * max(1.0, abs(paper.item()))
    for g_ours, g_paper in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(paper, inputs), strict=True):
        assert (g_ours - g_paper).abs().max().item() <= tol


# ---- losses against the papers' formulas ---------------------------------------------------------------


def test_trades_loss_is_the_papers_formula(logits):
    clean, adv, y = logits
    beta, rows = 6.0, torch.arange(len(y))
    # Zhang et al. 2019 eq. (5) as trades.py:79-83 computes it: CE(f(x), y) + beta · mean_i KL(p(x_i) || p(x'_i))
    p, log_p, log_q = clean.softmax(1), clean.log_softmax(1), adv.log_softmax(1)
    paper = -log_p[rows, y].mean() + beta * (p * (log_p - log_q)).sum(1).mean()
    assert_same_value_and_gradients(trades_loss(adv, y, clean, beta), paper, (clean, adv))


def test_mart_loss_is_the_papers_formula(logits):
    clean, adv, y = logits
    beta, rows = 5.0, torch.arange(len(y))
    p_adv, p_clean = adv.softmax(1), clean.softmax(1)
    assert (p_adv.argmax(1) == y).any() and (p_adv.argmax(1) != y).any()
    runner_up = p_adv.masked_fill(F.one_hot(y, 5).bool(), -1.0).argmax(1)  # max over k != y

    def mart(c_wrong: float, c_log: float, c_weight: float) -> torch.Tensor:
        # Wang et al. 2020 eq. (9): BCE(p(x'), y) + beta · KL(p(x) || p(x')) · (1 - p_y(x)), averaged over the batch
        bce = -p_adv[rows, y].log() - (c_wrong - p_adv[rows, runner_up] + c_log).log()
        kl = (p_clean * (p_clean.log() - (p_adv + c_log).log())).sum(1)
        return (bce + beta * kl * (c_weight - p_clean[rows, y])).mean()

    ours = mart_loss(adv, y, clean, beta)
    # mart.py:48-55 guards the logs and the weight with these constants; without them the value moves by < 1e-3
    assert_same_value_and_gradients(ours, mart(1.0001, 1e-12, 1.0000001), (clean, adv))
    assert abs(ours.item() - mart(1.0, 0.0, 1.0).item()) <= 1e-3


def test_ce_loss_and_objective_loss_defaults(logits):
    clean, adv, y = logits
    paper_ce = -adv.log_softmax(1)[torch.arange(len(y)), y].mean()
    assert_same_value_and_gradients(objective_loss("ce", adv, y), paper_ce, (adv,))
    # beta defaults: the official training scripts' (train_trades_cifar10.py, MART train_resnet.py)
    assert OBJECTIVES["trades"].beta == 6.0 and OBJECTIVES["mart"].beta == 5.0
    for name, loss in (("trades", trades_loss), ("mart", mart_loss)):
        default, given = loss(adv, y, clean, OBJECTIVES[name].beta), loss(adv, y, clean, 2.0)
        assert objective_loss(name, adv, y, logits_clean=clean).item() == default.item() != given.item()
        assert objective_loss(name, adv, y, logits_clean=clean, beta=2.0).item() == given.item()
        assert abs(OBJECTIVES[name].official_alpha(0.031) - 0.007) <= 1e-12 and OBJECTIVES[name].steps == 10
        with pytest.raises(ValueError, match="clean logits"):
            objective_loss(name, adv, y)


# ---- the objectives' own attacks --------------------------------------------------------------------


def kl_per_example(model, x, x_adv) -> torch.Tensor:
    with torch.no_grad():
        return F.kl_div(model(x_adv).log_softmax(1), model(x).softmax(1), reduction="none").sum(1)


def test_trades_pgd_ascends_the_kl_within_the_ball(small_model, batch):
    x, _ = batch
    torch.manual_seed(0)
    x_adv = trades_pgd(small_model, x, EPS, EPS / 4, 10)
    corner = (x + EPS * torch.randn_like(x).sign()).clamp(0, 1)  # a random point as far away as allowed
    kl_adv, kl_corner = kl_per_example(small_model, x, x_adv), kl_per_example(small_model, x, corner)
    assert kl_adv.mean() >= 5 * kl_corner.mean(), (kl_adv.mean(), kl_corner.mean())
    assert (kl_adv > kl_corner).float().mean() >= 0.8
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and (x_adv - x).abs().max().item() <= EPS + 1e-6


def test_mart_pgd_ascends_the_ce_within_the_ball(small_model, batch):
    x, y = batch
    torch.manual_seed(0)
    x_adv = mart_pgd(small_model, x, y, EPS, EPS / 4, 10)
    with torch.no_grad():
        ce_clean = F.cross_entropy(small_model(x), y, reduction="none")
        ce_adv = F.cross_entropy(small_model(x_adv), y, reduction="none")
        acc_clean = (small_model(x).argmax(1) == y).float().mean().item()
        acc_adv = (small_model(x_adv).argmax(1) == y).float().mean().item()
    assert (ce_adv > ce_clean).all() and acc_clean >= 0.8 and acc_adv <= acc_clean - 0.4, (acc_clean, acc_adv)
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and (x_adv - x).abs().max().item() <= EPS + 1e-6


ACCEPTED = [(name, attack) for name, obj in OBJECTIVES.items() for attack in obj.attacks]


@pytest.mark.parametrize(("objective", "attack"), ACCEPTED, ids=[f"{o}-{a}" for o, a in ACCEPTED])
def test_training_attack_dispatch(small_model, batch, objective, attack):
    """Each accepted pair makes exactly the examples of the function it names, with the same random draws."""
    x, y = batch[0][:16], batch[1][:16]
    direct = {
        ("trades", "pgd"): lambda: trades_pgd(small_model, x, EPS, EPS / 4, 3),
        ("mart", "pgd"): lambda: mart_pgd(small_model, x, y, EPS, EPS / 4, 3),
        "pgd": lambda: pgd(small_model, x, y, EPS, EPS / 4, 3),
        "nfgsm": lambda: nfgsm(small_model, x, y, EPS, noise=1.5, alpha=EPS / 4),
        "fgsm_rs": lambda: fgsm(small_model, x, y, EPS, random_start=True, alpha=EPS / 4),
        "fgsm": lambda: fgsm(small_model, x, y, EPS, alpha=EPS / 4),
        "none": lambda: x,
    }
    expected = direct.get((objective, attack), direct[attack])
    torch.manual_seed(5)
    ours = training_attack(small_model, x, y, objective, attack, eps=EPS, alpha=EPS / 4, steps=3, noise=1.5)
    torch.manual_seed(5)
    assert torch.equal(ours, expected())
    assert not ours.requires_grad and all(p.grad is None for p in small_model.parameters())


@pytest.mark.parametrize(
    ("objective", "attack", "targeted", "match"),
    [
        ("trades", "none", False, "cannot train with attack 'none'.*use one of pgd"),
        ("trades", "fgsm_rs", False, "PGD on its own KL term"),
        ("trades", "nfgsm", False, "use one of pgd"),
        ("mart", "none", False, "use one of fgsm, fgsm_rs, nfgsm, pgd"),
        ("mart", "pgd", True, "untargeted"),
        ("trades", "pgd", True, "untargeted"),
        ("mse", "pgd", False, "unknown objective 'mse'"),
        ("ce", "bim", False, "unknown training attack 'bim'"),
    ],
)
def test_refused_combinations_are_one_line_errors(small_model, batch, objective, attack, targeted, match):
    with pytest.raises(RobustError, match=match) as info:
        check_objective(objective, attack, targeted)
    assert "\n" not in str(info.value)
    with pytest.raises(RobustError, match=match):
        training_attack(small_model, *batch, objective, attack, eps=EPS, alpha=EPS / 4, steps=1, targeted=targeted)


def test_ce_accepts_every_training_attack_targeted_or_not():
    for attack in TRAIN_ATTACKS:
        assert check_objective("ce", attack, targeted=True) is OBJECTIVES["ce"]
