"""Adversarial attacks on [0, 1] images: pure functions, no state.

Every image is a float tensor ``N×C×H×W`` in [0, 1]; normalization lives inside the model, so ``eps`` and
``alpha`` are in pixel units (``8/255`` = eight grey levels). Attacks take gradients with respect to the
input only: the model's parameters get no ``.grad``, and its train/eval mode and ``requires_grad`` flags are
left as they were (callers pick the BatchNorm mode). Results are detached, in [0, 1], and within
``eps`` of ``x`` in the L-infinity norm; :func:`nfgsm` alone, by design, may leave that ball (its bound is in
its docstring).

``y`` is the true label for untargeted attacks (the loss is ascended) and the *target* label when
``targeted=True`` (the loss toward ``y`` is descended).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust.checks import check_budget
from robust.errors import RobustError


@contextmanager
def seeded_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with torch's RNG (CPU, and ``device``'s when it is a GPU) forked and seeded with ``seed``:
    its random starts and targets are reproducible, and the caller's random stream is left where it was."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


# Wong et al. 2020's fast adversarial training step, as a multiple of eps, from a random start.
FGSM_RS_STEP = 1.25


def _check_batch(x: Tensor, y: Tensor) -> None:
    if x.dim() != 4:
        raise RobustError(f"images must be a batch N×C×H×W, got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise RobustError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")


def _input_grad(model: nn.Module, x: Tensor, y: Tensor, targeted: bool) -> Tensor:
    """Gradient of the attacker's objective w.r.t. ``x`` (ascent direction); no weight gradients."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        if targeted:
            loss = -loss
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Clip ``x_adv`` into the L-inf ball of radius ``eps`` around ``x`` and into [0, 1]."""
    delta = torch.clamp(x_adv - x, min=-eps, max=eps)
    return torch.clamp(x + delta, min=0, max=1).detach()


def _random_start(x: Tensor, eps: float, clamp: bool = True) -> Tensor:
    start = x + torch.empty_like(x).uniform_(-eps, eps)
    return torch.clamp(start, min=0, max=1) if clamp else start


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    targeted: bool = False,
    random_start: bool = False,
    alpha: float | None = None,
    clamp_start: bool = True,
) -> Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one signed-gradient step.

    With ``random_start=True`` it starts from a uniform point in the eps-ball and steps ``alpha`` (default
    ``FGSM_RS_STEP·eps`` = 1.25·eps), then projects back: Wong et al. 2020's fast adversarial training step.
    Without it, the step is ``alpha`` (default ``eps``) from ``x`` itself. ``clamp_start=False`` takes the gradient at
    the random start unclipped to [0, 1], as Wong et al.'s ``MNIST/train_mnist.py`` does (the result is clipped).

    Args:
        x: ``N×C×H×W`` float images in [0, 1]. y: ``N`` int64 labels (targets if ``targeted``).
        eps: L-inf budget in [0, 1] pixel units.
    Returns: detached ``N×C×H×W`` adversarial images in [0, 1] with ``|x_adv - x|_inf <= eps``.
    """
    if alpha is None:
        alpha = FGSM_RS_STEP * eps if random_start else eps
    check_budget(eps)
    _check_batch(x, y)
    x = x.detach()
    start = _random_start(x, eps, clamp_start) if random_start else x
    grad = _input_grad(model, start, y, targeted)
    return _project(start + alpha * grad.sign(), x, eps)


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
) -> Tensor:
    """Projected Gradient Descent, L-inf (Madry et al. 2018): ``steps`` signed steps of ``alpha``.

    With ``restarts > 1`` (needs ``random_start``), each example keeps the first restart that succeeds
    (misclassified, or the target reached when ``targeted``), else the last.

    Args:
        x: ``N×C×H×W`` float images in [0, 1]. y: ``N`` int64 labels (targets if ``targeted``).
        eps: L-inf budget in [0, 1] pixel units. alpha: step size in pixel units. steps: >= 1.
    Returns: detached ``N×C×H×W`` adversarial images in [0, 1] with ``|x_adv - x|_inf <= eps``.
    """
    check_budget(eps, alpha, steps)
    _check_batch(x, y)
    if restarts < 1:
        raise RobustError(f"restarts must be at least 1, got {restarts}")
    x = x.detach()
    best = None
    for _ in range(restarts):
        x_adv = _random_start(x, eps) if random_start else x.clone()
        for _ in range(int(steps)):
            grad = _input_grad(model, x_adv, y, targeted)
            x_adv = _project(x_adv + alpha * grad.sign(), x, eps)
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            pred = model(x_adv).argmax(1)
        success = pred == y if targeted else pred != y
        if best is None:
            best, done = x_adv, success
        else:
            take = success & ~done
            best = torch.where(take[:, None, None, None], x_adv, best)
            done = done | success
    return best


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
