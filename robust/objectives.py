"""Training objectives: the loss a training step minimizes, and the adversarial examples each one is made for.

Pure functions, no Lightning. Images are ``N×C×H×W`` floats in [0, 1]; ``eps`` and ``alpha`` are pixel units.

- ``ce``: cross-entropy on the training batch's logits, with any training attack (Madry et al. 2018 with ``pgd``;
  Wong et al. 2020 with ``fgsm_rs``; de Jorge et al. 2022 with ``nfgsm``).
- ``trades`` (Zhang et al. 2019, ``yaodongyu/TRADES``): ``CE(f(x), y) + beta·KL(p(x) ‖ p(x'))``, ``x'`` by PGD on
  that KL from ``x + 0.001·N(0, 1)``.
- ``mart`` (Wang et al. 2020, ``YisenWang/MART``): boosted CE on ``x'`` plus ``beta·KL(p(x) ‖ p(x'))`` weighted
  by ``1 - p_y(x)``, ``x'`` by PGD on the CE from ``x + 0.001·N(0, 1)``.

The official TRADES and MART code put the model in eval mode while attacking and back in train mode for the
loss; here the attack functions leave the model's mode and ``requires_grad`` flags as they found them (as
:mod:`robust.attacks` does), so the caller picks the BatchNorm mode (the module's ``attack_bn_mode``, default
``eval``, is the official choice). Both official repositories feed [0, 1] images to the model with no
normalization, as this project does, so their eps and step sizes carry over unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust.attacks import ATTACKS, _check_batch, _input_grad, _project, check_budget, fgsm, nfgsm, pgd
from robust.errors import RobustError

TRAIN_ATTACKS = ("none", *ATTACKS)  # the attack registry's, or none

# TRADES's and MART's PGD start: x + 0.001·N(0, 1), not clamped before the first gradient (trades.py:31, mart.py:20).
# TRADES needs it: the KL and its gradient are exactly zero at x' = x.
SMALL_START_STD = 0.001


# ---- losses from logits ----------------------------------------------------------------------------


def ce_loss(logits_adv: Tensor, y: Tensor, logits_clean: Tensor | None = None, beta: float | None = None) -> Tensor:
    """Mean cross-entropy of the training batch's logits (``N×K``) against ``y`` (``N``); the other arguments
    are unused (``ce`` has no clean term: the module mixes clean examples into the batch by ``adv_ratio``)."""
    return F.cross_entropy(logits_adv, y)


def trades_loss(logits_adv: Tensor, y: Tensor, logits_clean: Tensor, beta: float) -> Tensor:
    """TRADES (Zhang et al. 2019), as ``yaodongyu/TRADES`` trades.py:79-83 computes it:
    ``mean_i CE(f(x_i), y_i) + beta · mean_i KL(p(x_i) ‖ p(x'_i))``, with ``KL(p ‖ q) = Σ_k p_k (log p_k - log q_k)``
    (``KLDivLoss(log_softmax(f(x')), softmax(f(x)))`` summed, divided by the batch size). Gradients flow through
    both logits (``N×K``, clean ``f(x)`` and adversarial ``f(x')``), the clean softmax included, as in the original.
    """
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
    return F.cross_entropy(logits_clean, y) + beta * kl


def mart_loss(logits_adv: Tensor, y: Tensor, logits_clean: Tensor, beta: float) -> Tensor:
    """MART (Wang et al. 2020), as ``YisenWang/MART`` mart.py:38-56 computes it, its small constants included:
    ``mean_i [ BCE_i + beta · KL(p(x_i) ‖ p(x'_i)) · (1 - p_y(x_i)) ]`` where the boosted CE
    ``BCE_i = -log p_y(x'_i) - log(1 - max_{k≠y} p_k(x'_i))``. Logits are ``N×K``; gradients flow through both,
    the weight ``1 - p_y(x)`` included, as in the original."""
    probs_adv = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(probs_adv, dim=1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # most likely wrong class
    boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - probs_adv + 1e-12), runner_up)
    probs_clean = F.softmax(logits_clean, dim=1)
    true_clean = probs_clean.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(probs_adv + 1e-12), probs_clean, reduction="none").sum(dim=1)
    return boosted_ce + beta * (kl * (1.0000001 - true_clean)).mean()


# ---- the objectives' own attacks ---------------------------------------------------------------------


def _pgd_from_small_start(
    x: Tensor, grad_fn: Callable[[Tensor], Tensor], eps: float, alpha: float, steps: int
) -> Tensor:
    x_adv = x + SMALL_START_STD * torch.randn_like(x)
    for _ in range(int(steps)):
        x_adv = _project(x_adv + alpha * grad_fn(x_adv).sign(), x, eps)
    return x_adv


def trades_pgd(model: nn.Module, x: Tensor, eps: float, alpha: float, steps: int) -> Tensor:
    """TRADES's attack (trades.py:28-41): ``steps`` signed steps of ``alpha`` ascending ``KL(p(x) ‖ p(x'))``
    (no labels) from ``x + 0.001·N(0, 1)``, each projected to the eps ball and [0, 1].

    Args: x: ``N×C×H×W`` float images in [0, 1]; eps, alpha: pixel units; steps >= 1.
    Returns: detached ``N×C×H×W`` images in [0, 1] with ``|x' - x|_inf <= eps``; the model's mode, flags and
    parameter gradients untouched.
    """
    check_budget(eps, alpha, steps)
    x = x.detach()
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)

    def kl_grad(x_adv: Tensor) -> Tensor:
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(kl, x_adv)
        return grad

    return _pgd_from_small_start(x, kl_grad, eps, alpha, steps)


def mart_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int) -> Tensor:
    """MART's attack (mart.py:17-29): PGD ascending the cross-entropy, from ``x + 0.001·N(0, 1)`` instead of
    :func:`robust.attacks.pgd`'s uniform start. Shapes, units and guarantees as :func:`trades_pgd`."""
    check_budget(eps, alpha, steps)
    _check_batch(x, y)
    return _pgd_from_small_start(x.detach(), lambda x_adv: _input_grad(model, x_adv, y, False), eps, alpha, steps)


# ---- registry and dispatch ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """A training objective: its loss, the training attacks it accepts, and its official defaults."""

    loss: Callable[..., Tensor]
    attacks: tuple[str, ...]
    why_attacks: str = ""
    beta: float | None = None
    steps: int | None = None
    alpha_per_eps: float | None = None

    def official_alpha(self, eps: float) -> float | None:
        """The official step size scaled to ``eps`` (None: the training attack's own default)."""
        return None if self.alpha_per_eps is None else self.alpha_per_eps * eps


# Official training defaults: eps 0.031, step 0.007, 10 steps in both train_trades_cifar10.py:30-37 and
# MART's train_resnet.py:35-41; beta 6.0 for TRADES (train_trades_cifar10.py:36) and 5.0 for MART with
# ResNet-18 (train_resnet.py:41; the WideResNet script and mart_loss's own default use 6.0).
OBJECTIVES: dict[str, Objective] = {
    "ce": Objective(ce_loss, TRAIN_ATTACKS),
    "trades": Objective(
        trades_loss,
        attacks=("pgd",),
        why_attacks="its adversarial examples come from PGD on its own KL term; attack_steps 1 gives a single step",
        beta=6.0,
        steps=10,
        alpha_per_eps=0.007 / 0.031,
    ),
    "mart": Objective(
        mart_loss,
        attacks=("fgsm", "fgsm_rs", "nfgsm", "pgd"),
        why_attacks="its loss is computed on adversarial examples",
        beta=5.0,
        steps=10,
        alpha_per_eps=0.007 / 0.031,
    ),
}


def _lookup(objective: str) -> Objective:
    if objective not in OBJECTIVES:
        raise RobustError(f"unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[objective]


def check_objective(objective: str, attack: str, targeted: bool = False) -> Objective:
    """The :class:`Objective` called ``objective``; :class:`RobustError` (one line) for an unknown name, an
    attack it does not train with, or a targeted attack with ``trades`` / ``mart`` (their attacks are untargeted)."""
    obj = _lookup(objective)
    if attack not in TRAIN_ATTACKS:
        raise RobustError(f"unknown training attack {attack!r}: choose one of {', '.join(TRAIN_ATTACKS)}")
    if attack not in obj.attacks:
        raise RobustError(
            f"objective {objective!r} cannot train with attack {attack!r} ({obj.why_attacks}): "
            f"use one of {', '.join(obj.attacks)}"
        )
    if targeted and objective != "ce":
        raise RobustError(f"objective {objective!r} trains on untargeted adversarial examples only: set target none")
    return obj


def training_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    objective: str,
    attack: str,
    *,
    eps: float,
    alpha: float,
    steps: int,
    noise: float = 2.0,
    targeted: bool = False,
    clamp_start: bool = True,
    norm: str = "linf",
    early_exit: bool = False,
) -> Tensor:
    """The adversarial examples ``objective`` trains on, made by ``attack`` (checked by :func:`check_objective`).

    ``trades`` + ``pgd``: :func:`trades_pgd`; ``mart`` + ``pgd``: :func:`mart_pgd`; otherwise the attack of that
    name from :mod:`robust.attacks` in the threat model ``norm`` (``pgd`` with its uniform random start and, with
    ``early_exit``, each example frozen at its first misclassified iterate as Wong et al.'s MNIST PGD training does;
    ``noise`` for ``nfgsm``; ``clamp_start`` for ``fgsm_rs``); ``none`` returns ``x``. ``y``: ``N`` labels (targets
    when ``targeted``). Runs in the model's current mode: wrap it in the BatchNorm mode wanted. Returns detached
    ``N×C×H×W`` images in [0, 1].
    """
    check_objective(objective, attack, targeted)
    if attack == "none":
        return x.detach()
    if norm not in ATTACKS[attack].norms or (norm != "linf" and objective != "ce"):
        raise RobustError(
            f"{attack} with objective {objective} has no {norm} version: L2 trains with ce and "
            f"{', '.join(a for a, info in ATTACKS.items() if norm in info.norms)}"
        )
    if attack == "pgd" and objective == "trades":
        return trades_pgd(model, x, eps, alpha, steps)
    if attack == "pgd" and objective == "mart":
        return mart_pgd(model, x, y, eps, alpha, steps)
    if attack == "pgd":
        return pgd(model, x, y, eps, alpha, steps, targeted=targeted, norm=norm, early_exit=early_exit)
    if attack == "nfgsm":
        return nfgsm(model, x, y, eps, noise=noise, alpha=alpha, targeted=targeted)
    return fgsm(
        model,
        x,
        y,
        eps,
        targeted=targeted,
        random_start=attack == "fgsm_rs",
        alpha=alpha,
        clamp_start=clamp_start,
        norm=norm,
    )


def objective_loss(
    objective: str, logits_adv: Tensor, y: Tensor, *, logits_clean: Tensor | None = None, beta: float | None = None
) -> Tensor:
    """The scalar training loss of ``objective`` from ``N×K`` logits: ``logits_adv`` of the training batch (for
    ``trades`` / ``mart``, of the adversarial examples) and ``logits_clean`` of the clean images (required by
    ``trades`` and ``mart``, computed in a separate forward pass as in the official code). ``beta``: default the
    objective's official value."""
    obj = _lookup(objective)
    if objective != "ce" and logits_clean is None:
        raise ValueError(f"objective {objective!r} needs the clean logits (logits_clean)")
    return obj.loss(logits_adv, y, logits_clean, obj.beta if beta is None else beta)
