"""The threat suite: every threat's predictions on one batch, for validation, the report and the overfitting guard.

A threat is a key of :data:`THREATS`; its predictions are ``N`` class ids, scored against the true labels
(``targeted_success`` against the random target: the fraction reaching it, lower is better):

- ``clean``; ``fgsm``, ``pgd`` (PGD-``steps``, random start), ``apgd`` (APGD-CE, AutoAttack's first component,
  via torchattacks) made against the bare model;
- ``jpeg`` (clean images through JPEG); ``jpeg_fgsm``, ``jpeg_pgd`` (those adversarial examples, transferred
  through JPEG); ``bpda_pgd`` (PGD through the straight-through JPEG, then JPEG: the adaptive attack);
- ``autoattack`` (torchattacks' standard AutoAttack, slow, opt-in) and ``aa_worst`` (the per-example worst case of
  ``pgd_worst``'s attacks and AutoAttack); ``targeted_success`` (targeted PGD);
- worst cases, per example (:data:`WORST_CASES`): ``pgd_worst`` is correct only where ``fgsm``, ``pgd`` and
  ``apgd`` all are, ``jpeg_worst`` only where every attack through JPEG (``jpeg_fgsm``, ``jpeg_pgd``,
  ``bpda_pgd``) is: the figures to claim. Their predictions equal the label only where every part is correct
  (else the first wrong part's prediction), so accuracy metrics work unchanged for every key.

Images are ``N×C×H×W`` floats in [0, 1]; eps and steps are in pixel units. Default step sizes live here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from robust.attacks import FGSM_RS_STEP, check_budget, fgsm, pgd, random_other_class, seeded_rng
from robust.defenses import JpegDefended, check_quality, jpeg
from robust.errors import RobustError

THREATS = ("clean", "fgsm", "pgd", "apgd", "pgd_worst", "jpeg", "jpeg_fgsm", "jpeg_pgd", "bpda_pgd", "jpeg_worst",
           "autoattack", "aa_worst", "targeted_success")  # fmt: skip
AUTOATTACK_THREATS = ("autoattack", "aa_worst")  # slow: opt-in
DEFAULT_THREATS = tuple(k for k in THREATS if k not in AUTOATTACK_THREATS)
WORST_CASES = {"pgd_worst": ("fgsm", "pgd", "apgd"), "jpeg_worst": ("jpeg_fgsm", "jpeg_pgd", "bpda_pgd"),
               "aa_worst": ("fgsm", "pgd", "apgd", "autoattack")}  # fmt: skip
# key -> (the attack making its inputs, None for the clean images; whether the inputs then go through JPEG)
_INPUTS = {"clean": (None, False), "fgsm": ("fgsm", False), "pgd": ("pgd", False), "apgd": ("apgd", False),
           "jpeg": (None, True), "jpeg_fgsm": ("fgsm", True), "jpeg_pgd": ("pgd", True), "bpda_pgd": ("bpda", True),
           "autoattack": ("autoattack", False), "targeted_success": ("targeted", False)}  # fmt: skip


def default_alpha(eps: float) -> float:
    """Evaluation PGD step when none is given: eps/4; 1/255 for eps = 0, where any step is void."""
    return eps / 4 if eps > 0 else 1 / 255


def training_alpha(attack: str, eps: float) -> float:
    """Training attack step when none is given: 1.25·eps for ``fgsm_rs`` (Wong et al. 2020), eps/4 for ``pgd``,
    eps for ``fgsm``."""
    if attack == "pgd":
        return default_alpha(eps)
    return FGSM_RS_STEP * eps if attack == "fgsm_rs" else eps


@contextmanager
def bn_mode(model: nn.Module, mode: Literal["eval", "train"]) -> Iterator[None]:
    """Put ``model`` in ``mode`` for the block, then restore its previous mode."""
    was_training = model.training
    model.train(mode == "train")
    try:
        yield
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class ThreatSpec:
    """What to measure: L-inf budget ``eps`` in [0, 1] pixel units; PGD ``steps`` of ``alpha`` (default
    :func:`default_alpha`) with ``restarts`` random restarts (for ``pgd``, ``bpda_pgd``, the targeted attack and
    APGD); JPEG ``quality``; ``seed`` of random starts and targets; the ``threats`` (keys of :data:`THREATS`)."""

    eps: float
    alpha: float | None = None
    steps: int = 10
    restarts: int = 1
    quality: int = 75
    seed: int = 0
    threats: tuple[str, ...] = DEFAULT_THREATS

    def __post_init__(self) -> None:
        object.__setattr__(self, "threats", tuple(self.threats))
        check_budget(self.eps, self.step, self.steps)
        if self.restarts < 1:
            raise RobustError(f"restarts must be at least 1, got {self.restarts}")
        check_quality(self.quality)
        unknown = [k for k in self.threats if k not in THREATS]
        if unknown or not self.threats:
            raise RobustError(f"unknown threat(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(THREATS)}")

    @property
    def step(self) -> float:
        """The PGD step in force: ``alpha``, else :func:`default_alpha` of ``eps``."""
        return default_alpha(self.eps) if self.alpha is None else float(self.alpha)

    def for_batch(self, index: int) -> ThreatSpec:
        """This spec for the ``index``-th batch of a pass: seeded ``seed + index``, so batches differ and every
        pass repeats them."""
        return replace(self, seed=self.seed + index)


def apgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int = 1, seed: int = 0) -> Tensor:
    """APGD-CE (Croce & Hein 2020) via torchattacks: ``N×C×H×W`` [0, 1] -> adversarial images within ``eps``.

    Where it fails, an image comes back unchanged. torchattacks reseeds torch's global RNG with ``seed``: call it
    under :func:`robust.attacks.seeded_rng` to leave the caller's stream alone."""
    import torchattacks

    attack = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=restarts, loss="ce", seed=seed)
    return attack(x, y).detach()


def _autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, num_classes: int, seed: int) -> Tensor:
    import torchattacks

    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=num_classes, seed=seed)
    return attack(x, y).detach()


def _attack(name: str, model: nn.Module, x: Tensor, y: Tensor, spec: ThreatSpec, target, num_classes) -> Tensor:
    """The adversarial images of attack ``name`` (a first element of :data:`_INPUTS`)."""
    eps, alpha, steps, restarts = spec.eps, spec.step, spec.steps, spec.restarts
    if name == "fgsm":
        return fgsm(model, x, y, eps)
    if name == "pgd":
        return pgd(model, x, y, eps, alpha, steps, restarts=restarts)
    if name == "bpda":
        return pgd(JpegDefended(model, spec.quality, straight_through=True), x, y, eps, alpha, steps, restarts=restarts)
    if name == "targeted":
        return pgd(model, x, target, eps, alpha, steps, targeted=True, restarts=restarts)
    if name == "apgd":
        return apgd(model, x, y, eps, steps, restarts, spec.seed)
    return _autoattack(model, x, y, eps, num_classes, spec.seed)


def worst_case(y: Tensor, parts: list[Tensor]) -> Tensor:
    """Per-example worst case of several threats' predictions (each ``N``): ``y`` where every part is correct,
    else the first wrong part's prediction."""
    worst = y
    for part in reversed(parts):
        worst = torch.where(part != y, part, worst)
    return worst


def predictions(model: nn.Module, x: Tensor, y: Tensor, spec: ThreatSpec, target: Tensor | None = None) -> dict:
    """Predictions (``N`` class ids) of ``model`` under each threat of ``spec``, plus ``"target"`` (the targets,
    when ``targeted_success`` is asked for: ``target``, else a random other class per example).

    ``x``: ``N×C×H×W`` in [0, 1]; ``y``: ``N`` true labels. Only the attacks the asked keys need run (worst cases
    run their parts), each with the model in eval mode under its own fork of the RNG seeded with ``spec.seed``:
    a key's figure does not depend on which other keys were asked for, and the caller's RNG and model mode are
    left as they were.
    """
    wanted = set(spec.threats)
    for key, parts in WORST_CASES.items():
        if key in wanted:
            wanted.update(parts)
    draw_target = "targeted_success" in wanted and target is None
    made: dict[str | None, Tensor] = {None: x}
    preds: dict[str, Tensor] = {}
    num_classes = None
    with bn_mode(model, "eval"), torch.enable_grad():
        if draw_target or wanted & {"clean", "autoattack"}:
            with torch.no_grad():
                logits = model(x)
            num_classes, preds["clean"] = logits.shape[1], logits.argmax(1)
        if draw_target:
            with seeded_rng(spec.seed, x.device):
                target = random_other_class(y, num_classes)
        for key in THREATS:
            if key not in wanted or key in WORST_CASES or key == "clean":
                continue
            attack, through_jpeg = _INPUTS[key]
            if attack not in made:
                with seeded_rng(spec.seed, x.device):
                    made[attack] = _attack(attack, model, x, y, spec, target, num_classes)
            with torch.no_grad():
                inputs = jpeg(made[attack], spec.quality) if through_jpeg else made[attack]
                preds[key] = model(inputs).argmax(1)
    for key, parts in WORST_CASES.items():
        if key in wanted:
            preds[key] = worst_case(y, [preds[p] for p in parts])
    out = {k: preds[k] for k in spec.threats}
    if "targeted_success" in wanted:
        out["target"] = target
    return out


def labels_for(key: str, preds: dict, y: Tensor) -> Tensor:
    """What ``key``'s predictions are scored against: the targets for ``targeted_success``, else ``y``."""
    return preds["target"] if key == "targeted_success" else y


def correct_counts(preds: dict, y: Tensor, keys: tuple[str, ...]) -> list[int]:
    """For each of ``keys``, how many of its predictions in ``preds`` (:func:`predictions`) hit what they are
    scored against (:func:`labels_for`): exact integers, which add up across batches and processes."""
    return [int((preds[key] == labels_for(key, preds, y)).sum()) for key in keys]


def accuracy(model: nn.Module, x: Tensor, y: Tensor, spec: ThreatSpec, batch_size: int = 256) -> dict[str, float]:
    """Accuracy in [0, 1] of ``model`` under each threat of ``spec`` on ``x`` (``N×C×H×W`` in [0, 1]), ``y``
    (``N``), in chunks of ``batch_size`` on the model's device (chunk ``i`` under ``spec.for_batch(i)``)."""
    device = next(model.parameters()).device
    correct = [0] * len(spec.threats)
    for i, (xb, yb) in enumerate(zip(x.split(batch_size), y.split(batch_size), strict=True)):
        xb, yb = xb.to(device), yb.to(device)
        counts = correct_counts(predictions(model, xb, yb, spec.for_batch(i)), yb, spec.threats)
        correct = [c + n for c, n in zip(correct, counts, strict=True)]
    return {key: c / len(y) for key, c in zip(spec.threats, correct, strict=True)}
