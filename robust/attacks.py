"""Adversarial attacks on [0, 1] images: pure functions, no state.

Every image is a float tensor ``N×C×H×W`` in [0, 1]; normalization lives inside the model, so ``eps`` and
``alpha`` are in pixel units (``8/255`` = eight grey levels). Two threat models (``norm``): ``"linf"`` (every
pixel moves at most ``eps``; steps along the gradient's sign) and ``"l2"`` (the perturbation's Euclidean norm over
all ``C·H·W`` values is at most ``eps``; steps along the gradient divided by its L2 norm, per example).

Attacks take gradients with respect to the input only: the model's parameters get no ``.grad``, and its train/eval
mode and ``requires_grad`` flags are left as they were (callers pick the BatchNorm mode). Results are detached, in
[0, 1], and within ``eps`` of ``x`` in the attack's norm; :func:`nfgsm` alone, by design, may leave that ball (its
bound is in its docstring).

``y`` is the true label for untargeted attacks (the loss is ascended) and the *target* label when
``targeted=True`` (the loss toward ``y`` is descended).

:data:`ATTACKS` is the registry of the attacks by name with their default steps and properties: the one home of
those facts (training, validation, the threat suite and the overfitting guard read them from there).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust.checks import NORMS, check_budget, check_norm
from robust.errors import RobustError


@contextmanager
def seeded_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with torch's RNG (CPU, and ``device``'s when it is a GPU) forked and seeded with ``seed``:
    its random starts and targets are reproducible, and the caller's random stream is left where it was."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


# Added to an L2 gradient norm before dividing by it, as torchattacks' PGDL2 (``eps_for_division``): a zero gradient
# then gives a zero step instead of NaN.
L2_DIVISION_EPS = 1e-10


def _check_batch(x: Tensor, y: Tensor) -> None:
    if x.dim() != 4:
        raise RobustError(f"images must be a batch N×C×H×W, got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise RobustError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")


def _check_active(active: Tensor | None, x: Tensor) -> Tensor:
    """``active`` as an ``N`` bool mask on ``x``'s device (all examples when None)."""
    if active is None:
        return torch.ones(len(x), dtype=torch.bool, device=x.device)
    if active.dtype != torch.bool or active.shape != (len(x),):
        raise RobustError(f"active must be a bool mask of shape ({len(x)},), got {active.dtype} {tuple(active.shape)}")
    return active.to(x.device)


def _check_exit(model: nn.Module, seek: Tensor) -> None:
    """Early exit drops examples from the batch: refuse it where that changes the others' results (BatchNorm layers in
    train mode; a wrapper's own mode says nothing)."""
    batch_norm_training = any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    if batch_norm_training and seek.any():
        raise RobustError(
            "early exit needs the model in eval mode: in train mode BatchNorm makes each example's "
            "output depend on the batch around it"
        )


def _logits_and_grad(model: nn.Module, x: Tensor, y: Tensor, targeted: bool, n: int) -> tuple[Tensor, Tensor]:
    """The model's logits at ``x`` and the gradient w.r.t. ``x`` of the attacker's objective (ascent direction): the
    summed cross-entropy divided by ``n``, the size of the whole batch, so that an example's gradient does not depend
    on which others are in the forward pass (it is the batch-mean loss when all are). No weight gradients."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="sum") / n
        if targeted:
            loss = -loss
        (grad,) = torch.autograd.grad(loss, x)
    return logits.detach(), grad


def _input_grad(model: nn.Module, x: Tensor, y: Tensor, targeted: bool, n: int | None = None) -> Tensor:
    """Gradient of the attacker's objective w.r.t. ``x`` (ascent direction; loss as :func:`_logits_and_grad`,
    ``n`` defaults to ``len(x)``: the batch-mean cross-entropy); no weight gradients."""
    return _logits_and_grad(model, x, y, targeted, len(x) if n is None else n)[1]


def _l2_norms(t: Tensor) -> Tensor:
    """Per-example L2 norm of an ``N×C×H×W`` tensor, shaped ``N×1×1×1`` for broadcasting."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1)


def _direction(grad: Tensor, norm: str) -> Tensor:
    """The unit step direction of ``norm``: the gradient's sign (L-inf), or the gradient over its L2 norm (L2)."""
    if norm == "l2":
        return grad / (_l2_norms(grad) + L2_DIVISION_EPS)
    return grad.sign()


def _project(x_adv: Tensor, x: Tensor, eps: float, norm: str = "linf") -> Tensor:
    """Project ``x_adv`` onto the ``norm`` ball of radius ``eps`` around ``x`` (L-inf: clip each value; L2: scale
    the perturbation down to norm ``eps`` where it is longer), then into [0, 1]. Clamping to [0, 1] moves every value
    toward ``x`` (itself in [0, 1]), so the result stays in the ball."""
    if norm == "l2":
        delta = x_adv - x
        norms = _l2_norms(delta)
        delta = delta * torch.where(norms > eps, eps / norms, torch.ones_like(norms))
    else:
        delta = torch.clamp(x_adv - x, min=-eps, max=eps)
    return torch.clamp(x + delta, min=0, max=1).detach()


def _random_start(x: Tensor, eps: float, norm: str = "linf", clamp: bool = True) -> Tensor:
    """A random point of the ``norm`` ball of radius ``eps`` around ``x``, clamped to [0, 1] (unless ``clamp`` is
    false: L-inf only, the start of Wong et al.'s MNIST FGSM, whose gradient is taken outside [0, 1]). L-inf: uniform
    in the box. L2: as torchattacks' PGDL2 draws it (same calls, same order: one seed gives the same start), a Gaussian
    direction at a radius uniform in [0, eps] (not uniform in volume: it favours points near ``x``)."""
    if norm == "l2":
        delta = torch.empty_like(x).normal_()
        n = _l2_norms(delta)
        r = torch.zeros_like(n).uniform_(0, 1)
        delta *= r / n * eps
        return torch.clamp(x + delta, min=0, max=1).detach()
    start = x + torch.empty_like(x).uniform_(-eps, eps)
    return torch.clamp(start, min=0, max=1) if clamp else start


def _succeeds(pred: Tensor, y: Tensor, targeted: bool) -> Tensor:
    """Where the attack has succeeded: the prediction is the target (targeted), or is not the label."""
    return pred == y if targeted else pred != y


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    targeted: bool = False,
    random_start: bool = False,
    alpha: float | None = None,
    norm: str = "linf",
    active: Tensor | None = None,
    clamp_start: bool = True,
) -> Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one signed-gradient step; with ``norm="l2"`` the Fast
    Gradient Method, one step along the gradient over its L2 norm.

    With ``random_start=True`` it starts from a random point of the eps-ball (:func:`_random_start`) and steps
    ``alpha`` (default 1.25·eps, :data:`ATTACKS`' ``fgsm_rs``), then projects back: Wong et al. 2020's fast adversarial
    training step (for L2, its analogue). Without it, the step is ``alpha`` (default ``eps``) from ``x`` itself.
    ``clamp_start=False`` takes the gradient at the L-inf random start unclipped to [0, 1], as Wong et al.'s
    ``MNIST/train_mnist.py`` does (the result is clipped).

    Args:
        x: ``N×C×H×W`` float images in [0, 1]. y: ``N`` int64 labels (targets if ``targeted``).
        eps: budget in pixel units: L-inf in [0, 1]; L2 in [0, sqrt(C·H·W)]. norm: ``"linf"`` or ``"l2"``.
        active: ``N`` bool; only these examples are attacked, the others come back as ``x`` (random starts are
            drawn for the whole batch, so an example's result does not depend on which others are active).
    Returns: detached ``N×C×H×W`` adversarial images in [0, 1] within ``eps`` of ``x`` in ``norm``.
    """
    _check_batch(x, y)
    check_budget(eps, norm=norm, dims=x[0].numel())
    if alpha is None:
        alpha = ATTACKS["fgsm_rs" if random_start else "fgsm"].train_step * eps
    x = x.detach()
    start = _random_start(x, eps, norm, clamp_start) if random_start else x
    if active is None:
        grad = _input_grad(model, start, y, targeted)
        return _project(start + alpha * _direction(grad, norm), x, eps, norm)
    idx = _check_active(active, x).nonzero().squeeze(1)
    out = x.clone()
    if len(idx):
        grad = _input_grad(model, start[idx], y[idx], targeted, n=len(x))
        out[idx] = _project(start[idx] + alpha * _direction(grad, norm), x[idx], eps, norm)
    return out


class PgdRun(NamedTuple):
    """What one PGD run gives for each of its ``N`` examples (see :func:`pgd_run`)."""

    first: Tensor  # N×C×H×W: the first successful iterate (early-exit result); x where not sought
    pred: Tensor  # N int64: the model's prediction at ``first`` where sought; -1 elsewhere
    last: Tensor  # N×C×H×W: the final iterate (all-steps result); x where not run in full


def pgd_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    *,
    seek: Tensor,
    full: Tensor,
    targeted: bool = False,
    random_start: bool = True,
    restarts: int = 1,
    norm: str = "linf",
) -> PgdRun:
    """The PGD engine behind :func:`pgd`, with two roles per example (``N`` bool masks, which may overlap):

    - ``seek``: leave the active batch at the first iterate where the attack succeeds (misclassified; the target
      reached when ``targeted``) and keep it in ``first``, with the prediction there in ``pred``. Success is read
      from the logits of the forward pass the gradient needs anyway, and the final iterate is checked once.
    - ``full``: run all ``steps`` and keep the final iterate in ``last`` (the images a transferred attack needs,
      judged by another model than the one attacked).

    An example runs while one of its roles is unfinished; the rest of the batch shrinks (masks and indexing on the
    tensors' device, no loop over examples). Restart ``r`` runs only on the examples no earlier restart finished;
    a role keeps the image of its first successful restart, else of the first restart. Random starts are drawn
    for the whole batch every restart and the loss is scaled by the whole batch size, so an example's images do not
    depend on which others run (with the model in eval mode). Checks as :func:`pgd`; returns a :class:`PgdRun`.
    """
    _check_batch(x, y)
    check_budget(eps, alpha, steps, norm=norm, dims=x[0].numel())
    if restarts < 1:
        raise RobustError(f"restarts must be at least 1, got {restarts}")
    seek, full = _check_active(seek, x), _check_active(full, x)
    _check_exit(model, seek)
    x, n = x.detach(), len(x)
    first, last = x.clone(), x.clone()
    pred = torch.full_like(y, -1)
    seeking, running = seek.clone(), full.clone()  # roles not finished yet
    kept_first, kept_last = torch.zeros_like(seek), torch.zeros_like(full)  # an image is stored (first restart's)
    for _ in range(restarts):
        start = _random_start(x, eps, norm) if random_start else x
        idx = (seeking | running).nonzero().squeeze(1)
        if not len(idx):
            break
        xa, x0, ya, sk, fl = start[idx], x[idx], y[idx], seeking[idx], running[idx]
        for _ in range(int(steps)):
            logits, grad = _logits_and_grad(model, xa, ya, targeted, n)
            hit = sk & _succeeds(logits.argmax(1), ya, targeted)
            if hit.any():
                first[idx[hit]], pred[idx[hit]] = xa[hit], logits.argmax(1)[hit]
                seeking[idx[hit]] = False
                sk = sk & ~hit
            xa = _project(xa + alpha * _direction(grad, norm), x0, eps, norm)
            stay = sk | fl
            if not stay.all():
                xa, x0, ya, sk, fl, idx = xa[stay], x0[stay], ya[stay], sk[stay], fl[stay], idx[stay]
                if not len(idx):
                    break
        if sk.any() or (fl.any() and restarts > 1):  # the final iterate's verdict is needed
            with torch.no_grad():
                p = model(xa).argmax(1)
            ok = _succeeds(p, ya, targeted)
            take = sk & (ok | ~kept_first[idx])
            first[idx[take]], pred[idx[take]] = xa[take], p[take]
            kept_first[idx[take]] = True
            seeking[idx[sk & ok]] = False
        else:
            ok = torch.zeros_like(fl)
        take = fl & (ok | ~kept_last[idx])
        last[idx[take]] = xa[take]
        kept_last[idx[take]] = True
        running[idx[fl & ok]] = False
    return PgdRun(first, pred, last)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    *,
    targeted: bool = False,
    random_start: bool = True,
    restarts: int = 1,
    norm: str = "linf",
    early_exit: bool = False,
    active: Tensor | None = None,
) -> Tensor:
    """Projected Gradient Descent (Madry et al. 2018): ``steps`` steps of ``alpha`` along the gradient's sign
    (L-inf) or along the gradient over its L2 norm (L2), each followed by projection onto the eps-ball and [0, 1].
    The random start is :func:`_random_start`'s (for L2, torchattacks' PGDL2's).

    ``early_exit=False`` (training, and agreement with torchattacks): every example runs all steps.
    ``early_exit=True`` (measuring accuracy at the least cost): an example leaves the batch at the first iterate
    where the attack succeeds (misclassified; the target reached when ``targeted``) and keeps it; the others go on.
    Accuracy under it is never higher than under all steps, and an example that is never fooled gets the
    all-steps image.

    With ``restarts > 1`` (needs ``random_start``), each restart runs only on the examples no earlier one fooled,
    and each example keeps the image of the first restart that succeeds, else of the first restart.

    Args:
        x: ``N×C×H×W`` float images in [0, 1]. y: ``N`` int64 labels (targets if ``targeted``).
        eps: budget in pixel units: L-inf in [0, 1]; L2 in [0, sqrt(C·H·W)]. alpha: step size in pixel units
            (> 0; at most 1 for L-inf). steps: >= 1. norm: ``"linf"`` or ``"l2"``.
        active: ``N`` bool; only these examples are attacked, the others come back as ``x``.
    Returns: detached ``N×C×H×W`` adversarial images in [0, 1] within ``eps`` of ``x`` in ``norm``.
    """
    _check_batch(x, y)
    active = _check_active(active, x)
    none = torch.zeros_like(active)
    run = pgd_run(
        model,
        x,
        y,
        eps,
        alpha,
        steps,
        seek=active if early_exit else none,
        full=none if early_exit else active,
        targeted=targeted,
        random_start=random_start,
        restarts=restarts,
        norm=norm,
    )
    return run.first if early_exit else run.last


# ---- APGD (Croce & Hein 2020), as torchattacks implements it, per example ----------------------------------


# The fewest classes the DLR losses are defined for: the untargeted denominator is z_1 - z_3 (the largest logit minus
# the third), the targeted one z_1 - (z_3 + z_4)/2. With fewer, AutoAttack's reference offers cross-entropy instead.
DLR_MIN_CLASSES = 3
DLR_TARGETED_MIN_CLASSES = 4


def _check_dlr_classes(num_classes: int, targeted: bool) -> None:
    needed = DLR_TARGETED_MIN_CLASSES if targeted else DLR_MIN_CLASSES
    if num_classes < needed:
        raise RobustError(
            f"the {'targeted ' if targeted else ''}DLR loss needs {needed} classes or more, the model has "
            f"{num_classes}: use loss ce"
        )


def _dlr_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Per-example Difference-of-Logits-Ratio loss (Croce & Hein 2020), torchattacks' formulas: untargeted (at least
    :data:`DLR_MIN_CLASSES` classes), or targeted toward ``target`` (:data:`DLR_TARGETED_MIN_CLASSES`). ``N×K`` logits
    -> ``N``."""
    _check_dlr_classes(logits.shape[1], targeted=target is not None)
    (z, order), rows = logits.sort(dim=1), torch.arange(len(y), device=y.device)
    if target is not None:
        return -(logits[rows, y] - logits[rows, target]) / (z[:, -1] - 0.5 * z[:, -3] - 0.5 * z[:, -4] + 1e-12)
    top_is_y = (order[:, -1] == y).to(logits.dtype)
    return -(logits[rows, y] - z[:, -2] * top_is_y - z[:, -1] * (1.0 - top_is_y)) / (z[:, -1] - z[:, -3] + 1e-12)


def _apgd_start(x: Tensor, eps: float, norm: str) -> Tensor:
    """APGD's random start as torchattacks draws it (on the CPU generator, then moved: the same start on every
    device): on the surface of the eps-ball (L-inf: a uniform direction scaled to max-norm eps; L2: a Gaussian
    direction scaled to norm eps), clamped to [0, 1]."""
    if norm == "l2":
        t = torch.randn(x.shape).to(x.device)
        return (x + eps * t / ((t**2).sum(dim=(1, 2, 3), keepdim=True).sqrt() + 1e-12)).clamp(0.0, 1.0)
    t = 2 * torch.rand(x.shape).to(x.device) - 1
    return (x + eps * t / t.reshape([len(t), -1]).abs().max(dim=1, keepdim=True)[0].reshape([-1, 1, 1, 1])).clamp(0, 1)


def _apgd_step(x_adv: Tensor, x: Tensor, grad: Tensor, grad2: Tensor, step: Tensor, eps: float, a: float, norm: str):
    """One APGD update with momentum ``a`` (torchattacks' arithmetic, operation for operation)."""
    if norm == "l2":
        x1 = x_adv + step * grad / ((grad**2).sum(dim=(1, 2, 3), keepdim=True).sqrt() + 1e-12)
        d = x1 - x
        dn = (d**2).sum(dim=(1, 2, 3), keepdim=True).sqrt()
        x1 = torch.clamp(x + d / (dn + 1e-12) * torch.min(eps * torch.ones_like(x), dn), 0.0, 1.0)
        x1 = x_adv + (x1 - x_adv) * a + grad2 * (1 - a)
        d = x1 - x
        dn = (d**2).sum(dim=(1, 2, 3), keepdim=True).sqrt()
        return torch.clamp(x + d / (dn + 1e-12) * torch.min(eps * torch.ones_like(x), dn + 1e-12), 0.0, 1.0)
    x1 = torch.clamp(torch.min(torch.max(x_adv + step * torch.sign(grad), x - eps), x + eps), 0.0, 1.0)
    return torch.clamp(torch.min(torch.max(x_adv + (x1 - x_adv) * a + grad2 * (1 - a), x - eps), x + eps), 0.0, 1.0)


class _ApgdOut(NamedTuple):
    fooled: Tensor  # N bool: misclassified at some iterate
    first: Tensor  # N×C×H×W: the first such iterate (x where never)
    pred: Tensor  # N: the prediction there (y where never)
    last: Tensor  # N×C×H×W: the last such iterate (x where never; the first where the example left early)


def _apgd_single(model, x, y, target, eps, steps, norm, loss, rho, start, may_exit) -> _ApgdOut:
    """One APGD run from ``start``, every example attacked: the schedule of torchattacks' ``APGD.attack_single_run``
    (step 2·eps, halved at checkpoints where the loss oscillated or stalled, the example then going back to its best
    point; momentum 0.75), every quantity per example but the checkpoint schedule, which depends on ``steps`` alone.
    ``may_exit`` (``N`` bool): those examples leave the batch at their first misclassified iterate."""
    steps_2, steps_min, size_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    n = len(x)
    idx = torch.arange(n, device=x.device)
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    first, last, pred = x.clone(), x.clone(), y.clone()

    def objective(x_adv, y_, target_):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x_adv)
            if loss == "dlr":
                per_example = _dlr_loss(logits, y_, target_)
            elif target_ is None:
                per_example = F.cross_entropy(logits, y_, reduction="none")
            else:  # AutoAttack's reference ce-targeted loss: ascended, it climbs toward the target
                per_example = -F.cross_entropy(logits, target_, reduction="none")
            (g,) = torch.autograd.grad(per_example.sum(), x_adv)
        return logits.detach(), per_example.detach(), g.detach()

    def record(x_adv, logits, y_, idx_):
        p = logits.argmax(1)
        wrong = p != y_
        new = wrong & ~fooled[idx_]
        first[idx_[new]], pred[idx_[new]] = x_adv[new], p[new]
        last[idx_[wrong]] = x_adv[wrong]
        fooled[idx_[wrong]] = True
        return wrong

    x_adv = start.clone()
    logits, loss_now, grad = objective(x_adv, y, target)
    wrong = record(x_adv, logits, y, idx)
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss_now.clone()
    step = 2.0 * eps * torch.ones([n, 1, 1, 1], dtype=x.dtype, device=x.device)
    x_old = x_adv.clone()
    history = torch.zeros([steps, n], dtype=loss_now.dtype, device=x.device)  # the loss at each iterate
    loss_at_check, reduced_at_check = loss_best.clone(), torch.ones(n, dtype=torch.bool, device=x.device)
    k, since_check = steps_2, 0
    state = [
        x,
        y,
        target,
        x_adv,
        x_old,
        x_best,
        grad,
        grad_best,
        loss_best,
        step,
        loss_at_check,
        reduced_at_check,
        may_exit,
    ]
    for i in range(steps):
        leaving = wrong & state[-1]
        if leaving.any():
            stay = ~leaving
            idx, history, wrong = idx[stay], history[:, stay], wrong[stay]
            state = [t if t is None else t[stay] for t in state]
            if not len(idx):
                break
        x, y, target, x_adv, x_old, x_best, grad, grad_best, loss_best, step, loss_at_check, reduced_at_check, _ = state
        with torch.no_grad():
            grad2, x_old = x_adv - x_old, x_adv.clone()
            x_adv = _apgd_step(x_adv, x, grad, grad2, step, eps, 0.75 if i > 0 else 1.0, norm)
        logits, loss_now, grad = objective(x_adv, y, target)
        wrong = record(x_adv, logits, y, idx)
        history[i] = loss_now
        better = loss_now > loss_best
        x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], loss_now[better]
        since_check += 1
        if since_check == k:
            rising = torch.zeros_like(loss_best)
            for c in range(k):  # index -1 wraps around to the last row, as in torchattacks' numpy check
                rising += (history[i - c] > history[i - c - 1]).to(rising.dtype)
            halve = (rising <= k * rho) | (~reduced_at_check & (loss_at_check >= loss_best))
            reduced_at_check, loss_at_check = halve.clone(), loss_best.clone()
            step[halve] /= 2.0
            x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
            since_check, k = 0, max(k - size_decr, steps_min)
        state[:12] = [
            x,
            y,
            target,
            x_adv,
            x_old,
            x_best,
            grad,
            grad_best,
            loss_best,
            step,
            loss_at_check,
            reduced_at_check,
        ]
    return _ApgdOut(fooled, first, pred, last)


def apgd_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    *,
    seek: Tensor,
    full: Tensor,
    restarts: int = 1,
    norm: str = "linf",
    loss: str | None = None,
    targets: int = 0,
    skip_targets: int = 0,
    rho: float = 0.75,
) -> PgdRun:
    """APGD (Croce & Hein 2020: APGD-CE, APGD-DLR, APGD-T) with torchattacks' arithmetic and :func:`pgd_run`'s two
    roles: ``seek`` examples leave at their first misclassified iterate, ``full`` ones run every step. Only the
    examples of a role are attacked (torchattacks also skips the ones the model already gets wrong: callers pass
    the examples worth attacking).

    ``loss``: ``"ce"`` or ``"dlr"`` (:func:`_dlr_loss`: 3 classes or more); None: AutoAttack's, ``"ce"`` for APGD and
    ``"dlr"`` for APGD-T. ``targets > 0`` is APGD-T: for each of the ``targets`` classes (1 to classes - 1) the model
    finds most likely after the top one on the clean image, in turn, a run with the targeted loss toward it (the
    targeted DLR: 4 classes or more; or the targeted cross-entropy of AutoAttack's reference, ``loss="ce"``, for
    fewer); success is still a misclassification. A restart, or the next target, runs only on the examples still
    standing; random starts are drawn for the whole batch every run (:func:`_apgd_start`) and losses are per example,
    so an example's result does not depend on which others run (it is torchattacks' own when every example is
    attacked). ``skip_targets``: the first that many targets are taken as tried already (a caller that ran them,
    and passes only the examples they left standing): their random starts are drawn, not used, so the later
    targets' runs are the ones a full run makes.

    Args: as :func:`pgd_run`; ``eps`` in ``norm``'s pixel units, ``steps >= 1``, ``rho`` the step-halving threshold.
    Returns a :class:`PgdRun`: ``first`` and ``pred``, the first misclassified iterate and the prediction there
    (``x`` and ``y`` where never fooled); ``last``, the last misclassified iterate of the run that fooled it, which is
    what torchattacks returns (``x`` where never fooled).
    """
    _check_batch(x, y)
    check_budget(eps, None, steps, norm=norm, dims=x[0].numel())
    if restarts < 1:
        raise RobustError(f"restarts must be at least 1, got {restarts}")
    if not 0 <= skip_targets < max(targets, 1):
        raise RobustError(f"skip_targets must be 0 to targets - 1 ({targets} targets), got {skip_targets}")
    if loss is None:
        loss = "dlr" if targets else "ce"
    if loss not in ("ce", "dlr"):
        raise RobustError(f"APGD loss must be ce or dlr, got {loss!r}")
    seek, full = _check_active(seek, x), _check_active(full, x)
    _check_exit(model, seek)
    x = x.detach()
    first, last, pred = x.clone(), x.clone(), y.clone()
    standing = seek | full
    ranked = None
    if targets:
        with torch.no_grad():
            logits = model(x[standing]) if standing.any() else None
        if logits is None:
            return PgdRun(first, pred, last)
        if not 1 <= targets <= logits.shape[1] - 1:
            raise RobustError(
                f"APGD-T takes 1 to classes - 1 target classes, got {targets} targets for {logits.shape[1]} classes"
            )
        if loss == "dlr":
            _check_dlr_classes(logits.shape[1], targeted=True)
        # the classes in torchattacks' order: its target_class-th largest clean logit, ties as its ascending sort
        ranked = torch.zeros(len(x), targets + 1, dtype=torch.long, device=x.device)
        ranked[standing] = logits.sort(dim=1)[1][:, -(targets + 1) :].flip(1)
    for rank in range(1, targets + 1) if targets else [None]:
        for _ in range(restarts):
            start = _apgd_start(x, eps, norm)
            idx = standing.nonzero().squeeze(1)
            if not len(idx) or (rank is not None and rank <= skip_targets):
                continue
            target = None if rank is None else ranked[idx, rank]
            out = _apgd_single(
                model,
                x[idx],
                y[idx],
                target,
                eps,
                int(steps),
                norm,
                loss,
                rho,
                start[idx],
                may_exit=seek[idx] & ~full[idx],
            )
            won = idx[out.fooled]
            first[won], pred[won], last[won] = out.first[out.fooled], out.pred[out.fooled], out.last[out.fooled]
            standing[won] = False
    return PgdRun(first, pred, last)


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    *,
    restarts: int = 1,
    norm: str = "linf",
    loss: str | None = None,
    targets: int = 0,
    early_exit: bool = False,
    active: Tensor | None = None,
) -> Tensor:
    """APGD-CE / APGD-DLR / APGD-T (:func:`apgd_run`) on the examples of ``active`` (default all) that the model
    classifies correctly, as torchattacks' ``APGD`` / ``APGDT``: images in [0, 1] within ``eps`` in ``norm``.

    ``early_exit=False``: torchattacks' result (the last misclassified iterate, ``x`` where the attack fails), equal
    to it when the same seed is set and every example starts correct. ``early_exit=True``: the first misclassified
    iterate, at less cost; the same examples are fooled either way. Random starts come from torch's global RNG:
    run under :func:`seeded_rng` for a reproducible result.

    Args: ``x`` ``N×C×H×W`` in [0, 1]; ``y`` ``N`` labels; ``steps >= 1``; ``loss`` and ``targets`` (APGD-T, 1 to
    classes - 1) as :func:`apgd_run`. Returns: detached ``N×C×H×W`` images.
    """
    _check_batch(x, y)
    active = _check_active(active, x)
    if early_exit:
        _check_exit(model, active)  # before the clean pass, which in train mode would move BatchNorm statistics
    with torch.no_grad():
        correct = torch.zeros_like(active)
        if active.any():
            correct[active] = model(x[active]).argmax(1) == y[active]
    none = torch.zeros_like(correct)
    run = apgd_run(
        model,
        x,
        y,
        eps,
        steps,
        seek=correct if early_exit else none,
        full=none if early_exit else correct,
        restarts=restarts,
        norm=norm,
        loss=loss,
        targets=targets,
    )
    return run.first if early_exit else run.last


def nfgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    noise: float = 2.0,
    alpha: float | None = None,
    targeted: bool = False,
) -> Tensor:
    """N-FGSM (de Jorge et al. 2022, ``pdejorge/N-FGSM`` train.py): one signed-gradient step from strong noise.

    Start from ``x + U(-noise·eps, noise·eps)`` clamped to [0, 1], step ``alpha`` (default ``eps``) along the
    sign of the input gradient there (one forward, one backward), clamp to [0, 1] again. There is **no projection
    back to the eps ball**: the official code clips only when ``--clip`` is set, and its default is off. So by
    construction ``|x_adv - x|_inf <= noise·eps + alpha`` (``3·eps`` with the defaults); the clamps only move
    points toward ``x``, which is in [0, 1]. It is a *training* perturbation: never report accuracy under it as
    robustness at ``eps``. ``targeted`` (descend toward ``y``) is this project's addition.

    Args:
        x: ``N×C×H×W`` float images in [0, 1]. y: ``N`` int64 labels (targets if ``targeted``).
        eps: L-inf budget in [0, 1] pixel units. noise: ``k >= 0``, the noise half-width in units of ``eps``.
        alpha: step size in pixel units (default ``eps``, as in the paper's runs: ``--alpha`` = ``--epsilon``).
    Returns: detached ``N×C×H×W`` images in [0, 1] with ``|x_adv - x|_inf <= noise·eps + alpha``.
    """
    check_budget(eps, alpha)
    _check_batch(x, y)
    if alpha is None:
        alpha = eps
    if not float(noise) >= 0.0:
        raise RobustError(f"N-FGSM noise must be >= 0 (a multiple of eps), got {noise}")
    x = x.detach()
    start = torch.clamp(x + torch.empty_like(x).uniform_(-noise * eps, noise * eps), min=0, max=1)
    grad = _input_grad(model, start, y, targeted)
    return torch.clamp(start + alpha * grad.sign(), min=0, max=1).detach()


# ---- the registry: default steps and properties per attack -----------------------------------------

# An attack that projects onto the eps-ball makes no move at eps 0, whatever its step; a step must still be > 0.
VOID_STEP = 1 / 255


@dataclass(frozen=True)
class AttackInfo:
    """One attack by name: its function and the facts other modules need about it.

    ``train_step`` / ``eval_step``: the default step as a multiple of eps (L-inf, and every single-step attack);
    ``eval_step`` is None for a training perturbation, never to be reported as robustness. ``l2_step``: a multi-step
    attack's default L2 step as a multiple of ``eps / steps``. ``projects``: its result stays in the eps-ball.
    ``single_step``: one gradient step (the FGSM family, which the catastrophic-overfitting guard watches).
    ``norms``: the threat models it implements.
    """

    name: str
    fn: Callable[..., Tensor]
    train_step: float
    eval_step: float | None
    projects: bool
    single_step: bool
    l2_step: float | None = None
    norms: tuple[str, ...] = NORMS

    def default_step(self, eps: float, *, norm: str = "linf", steps: int = 1, training: bool = False) -> float:
        """The step (pixel units) used when none is given, for budget ``eps`` in ``norm`` and ``steps`` steps."""
        if check_norm(norm) not in self.norms:
            raise RobustError(f"attack {self.name!r} has no {norm} version (it has {', '.join(self.norms)})")
        per_eps = self.train_step if training else self.eval_step
        if per_eps is None:
            raise RobustError(f"{self.name} is a training perturbation: it has no evaluation step")
        step = self.l2_step * eps / int(steps) if norm == "l2" and self.l2_step is not None else per_eps * eps
        return VOID_STEP if step == 0 and self.projects else float(step)


ATTACKS: dict[str, AttackInfo] = {
    "fgsm": AttackInfo("fgsm", fgsm, train_step=1.0, eval_step=1.0, projects=True, single_step=True),
    # Wong et al. 2020's fast adversarial training: random start, step 1.25·eps (their alpha 10/255 at eps 8/255).
    "fgsm_rs": AttackInfo(
        "fgsm_rs", partial(fgsm, random_start=True), train_step=1.25, eval_step=None, projects=True, single_step=True
    ),
    # de Jorge et al. 2022: step eps from noise of 2·eps, no projection (pdejorge/N-FGSM defaults).
    "nfgsm": AttackInfo(
        "nfgsm", nfgsm, train_step=1.0, eval_step=None, projects=False, single_step=True, norms=("linf",)
    ),
    # L-inf: eps/4 in training and evaluation. L2: 2.5·eps/steps, the rule of Madry et al. 2018 and of their
    # robustness library (its documented default for L2 PGD): enough to cross the ball from side to side and back.
    "pgd": AttackInfo("pgd", pgd, train_step=0.25, eval_step=0.25, projects=True, single_step=False, l2_step=2.5),
}
SINGLE_STEP_ATTACKS = tuple(name for name, info in ATTACKS.items() if info.single_step)

# Wong et al. 2020's fast adversarial training step, as a multiple of eps, from a random start.
FGSM_RS_STEP = ATTACKS["fgsm_rs"].train_step


def attack_info(name: str) -> AttackInfo:
    """The registry entry of attack ``name``; :class:`RobustError` naming the known ones otherwise."""
    if name not in ATTACKS:
        raise RobustError(f"unknown attack {name!r}: choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name]


def default_step(name: str, eps: float, *, norm: str = "linf", steps: int = 1, training: bool = False) -> float:
    """The default step of attack ``name`` (:meth:`AttackInfo.default_step`)."""
    return attack_info(name).default_step(eps, norm=norm, steps=steps, training=training)


# ---- target choice -------------------------------------------------------------------------------


def random_other_class(y: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random class different from ``y`` for each example. ``y``: ``N`` int64 -> ``N``."""
    if num_classes < 2:
        raise RobustError("a targeted attack needs at least 2 classes")
    offset = torch.randint(1, num_classes, y.shape, generator=generator, device="cpu").to(y.device)
    return (y + offset) % num_classes


@torch.no_grad()
def least_likely_class(model: nn.Module, x: Tensor) -> Tensor:
    """The class the model finds least likely for each image (Kurakin et al. 2017). -> ``N`` int64."""
    return model(x).argmin(dim=1)


def fixed_class(y: Tensor, class_id: int, num_classes: int) -> Tensor:
    """``class_id`` for every example, checked against ``num_classes``. -> ``N`` int64."""
    if not 0 <= int(class_id) < num_classes:
        raise RobustError(
            f"target class id {class_id} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
        )
    return torch.full_like(y, int(class_id))


def resolve_class(spec: str | int, class_names: Sequence[str]) -> int:
    """Turn a class name (case-insensitive, e.g. ``"goldfish"``) or an id into a class id.

    Unknown names raise :class:`RobustError` suggesting close names.
    """
    n = len(class_names)
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        idx = int(text)
        if not 0 <= idx < n:
            raise RobustError(f"target class id {idx} is out of range: the model has {n} classes (0..{n - 1})")
        return idx
    # ImageNet names such as "goldfish, Carassius auratus": every comma-separated alias counts.
    aliases = {part.strip().lower(): i for i, name in enumerate(class_names) for part in [name, *name.split(",")]}
    if text.lower() in aliases:
        return aliases[text.lower()]
    close = difflib.get_close_matches(text.lower(), list(aliases), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise RobustError(f"unknown target class {text!r}{hint}")
