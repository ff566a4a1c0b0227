"""The threat suite: every threat's predictions on one batch, for validation, the report and the overfitting guard.

A threat is a key of :data:`THREATS`; its predictions are ``N`` class ids, scored against the true labels
(``targeted_success`` against the random target: the fraction reaching it, lower is better):

- ``clean``; ``fgsm``, ``pgd`` (PGD-``steps``, random start), ``apgd`` (APGD-CE, AutoAttack's first component,
  :func:`robust.attacks.apgd_run`: torchattacks' arithmetic, per example), ``apgd_dlr`` (APGD with the DLR loss)
  and ``apgd_t`` (APGD-T toward the ``apgd_targets`` most likely other classes, AutoAttack's second component),
  made against the bare model; ``square`` (torchattacks' Square, AutoAttack's gradient-free fourth component, with
  ``square_queries`` queries: opt-in, it finds what a model's masked gradients hide from the others);
- ``jpeg`` (clean images through JPEG); ``jpeg_fgsm``, ``jpeg_pgd`` (those adversarial examples, transferred
  through JPEG); ``bpda_pgd`` (PGD through the straight-through JPEG, then JPEG: the adaptive attack);
- ``autoattack`` (torchattacks' standard AutoAttack, slow, opt-in: its APGD-CE and APGD-T are ours with its
  settings, and reuse the verdicts of the suite's ``apgd`` and ``apgd_t`` where those ran with them; its FAB-T and
  Square are torchattacks', and a report runs them on the survivors of several batches at once:
  :func:`finish_autoattack`) and ``aa_worst`` (the per-example worst case of ``pgd_worst``'s attacks and
  AutoAttack); ``targeted_success`` (targeted PGD);
- worst cases, per example (:data:`WORST_CASES`): ``pgd_worst`` is correct only where ``fgsm``, ``pgd``,
  ``apgd``, ``apgd_dlr``, ``apgd_t`` and, when it runs, ``square`` all are, ``jpeg_worst`` only where every attack
  through JPEG (``jpeg_fgsm``, ``jpeg_pgd``, ``bpda_pgd``) is: the figures to claim. Their predictions equal the label
  only where every part is correct (else the first wrong part's prediction), so accuracy metrics work unchanged
  for every key.

The suite adapts to the model's class count K as AutoAttack's reference allows (:func:`apgd_part`; its DLR losses
need 3 and 4 logits): APGD-T takes at most K - 1 targets; at 3 classes it climbs the targeted cross-entropy; at 2,
APGD-DLR and APGD-T are APGD-CE step for step, so ``apgd``'s run stands for them. :meth:`ThreatSpec.adaptations`
says so in words, for reports, logs and cards; ``targeted_success`` on 2 classes has one target, the other class.
``autoattack`` (torchattacks' standard version) needs 4 classes.

Every threat runs in the spec's threat model (``norm``: L-inf or L2). How much is attacked is the spec's choice:

- ``early_exit`` (default): attack only what still stands. An example the model already gets wrong is not attacked
  (its prediction under every attack is the clean one; for the threats through JPEG, the defended model's clean
  prediction ``jpeg``), and PGD drops an example at the step it is fooled (:func:`robust.attacks.pgd_run`). The
  transferred attacks (``jpeg_fgsm``, ``jpeg_pgd``) still get the all-steps images: they are judged through JPEG,
  not by the model attacked. Accuracy is never above the all-steps figure.
- ``cascade``: each worst case's parts run in order (:data:`WORST_CASES`), each on the examples the earlier ones
  left standing, as AutoAttack does. A part's figure is then the accuracy *after* it and the parts before it
  (measured on survivors: ``ThreatSpec.mode`` says so), and the last part's is the worst case.

Images are ``N×C×H×W`` floats in [0, 1]; eps and steps are in pixel units. Default steps come from
:data:`robust.attacks.ATTACKS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from robust.attacks import (
    DLR_MIN_CLASSES,
    DLR_TARGETED_MIN_CLASSES,
    apgd_run,
    check_budget,
    default_step,
    fgsm,
    pgd_run,
    random_other_class,
    seeded_rng,
)
from robust.attacks import apgd as _apgd
from robust.checks import check_norm, check_square_queries
from robust.defenses import JpegDefended, check_quality, jpeg
from robust.errors import RobustError

THREATS = (
    "clean",
    "fgsm",
    "pgd",
    "apgd",
    "apgd_dlr",
    "apgd_t",
    "square",
    "pgd_worst",
    "jpeg",
    "jpeg_fgsm",
    "jpeg_pgd",
    "bpda_pgd",
    "jpeg_worst",
    "autoattack",
    "aa_worst",
    "targeted_success",
)
AUTOATTACK_THREATS = ("autoattack", "aa_worst")  # slow: opt-in
DEFAULT_THREATS = tuple(k for k in THREATS if k not in (*AUTOATTACK_THREATS, "square"))  # Square: with its queries
# Each worst case's parts, in the order the cascade runs them: cheap first, so the costly ones see few examples. The
# APGD-DLR and APGD-T parts break examples that FGSM, PGD and APGD-CE leave; Square those a model's masked gradients
# hide from all of them (docs/evaluation-cost.md measures both). Square is a part only when it runs
# (ThreatSpec.parts).
_CHEAP = ("fgsm", "pgd", "apgd", "apgd_dlr", "apgd_t", "square")
WORST_CASES = {
    "pgd_worst": _CHEAP,
    "jpeg_worst": ("jpeg_fgsm", "jpeg_pgd", "bpda_pgd"),
    "aa_worst": (*_CHEAP, "autoattack"),
}
_THROUGH_JPEG = ("jpeg_fgsm", "jpeg_pgd", "bpda_pgd")  # judged by the defended model: its clean prediction is jpeg
_ATTACKED = (
    "fgsm",
    "pgd",
    "apgd",
    "apgd_dlr",
    "apgd_t",
    "square",
    "jpeg_fgsm",
    "jpeg_pgd",
    "bpda_pgd",
    "autoattack",
    "targeted_success",
)
_ADAPTIVE = ("apgd_dlr", "apgd_t")  # the parts whose attack depends on the class count (apgd_part)


class ApgdPart(NamedTuple):
    """How an APGD part of the suite runs on a model's class count: ``kwargs`` of :func:`robust.attacks.apgd_run`
    (None: ``apgd``'s run stands for it), ``name`` as a column titles it, ``note``: how it departs from AutoAttack's
    component, in one sentence (None: it does not)."""

    kwargs: dict | None
    name: str
    note: str | None


def apgd_part(key: str, num_classes: int, targets: int) -> ApgdPart:
    """How ``apgd_dlr`` or ``apgd_t`` (``targets`` classes asked) runs on a model with ``num_classes`` >= 2 outputs.

    Where AutoAttack's DLR losses are undefined it falls back as AutoAttack's reference implementation allows: at 3
    classes APGD-T climbs the targeted cross-entropy (its ``ce-targeted`` loss). At 2 classes every loss that grows
    with the margin between the two logits (cross-entropy, targeted or not, or a DLR without its scale) has a
    gradient of the same sign and the same ordering of iterates, so APGD takes the very steps of APGD-CE: the part
    is ``apgd``'s run, not a repeat of it."""
    if key == "apgd_dlr":
        if num_classes >= DLR_MIN_CLASSES:
            return ApgdPart({"loss": "dlr"}, "APGD-DLR", None)
        return ApgdPart(
            None,
            "APGD-CE",
            f"APGD-DLR is APGD-CE (the DLR loss needs {DLR_MIN_CLASSES} logits, and on {num_classes} every margin loss "
            "takes cross-entropy's steps): apgd's run stands for it",
        )
    if key != "apgd_t":
        raise RobustError(f"{key} is not an APGD part of the suite; they are {', '.join(_ADAPTIVE)}")
    used = min(targets, num_classes - 1)
    if num_classes >= DLR_TARGETED_MIN_CLASSES:
        fewer = f"APGD-T toward {used} target classes, all that {num_classes} classes leave (asked: {targets})"
        return ApgdPart({"targets": used}, "APGD-T", fewer if used < targets else None)
    if num_classes > 2:
        return ApgdPart(
            {"targets": used, "loss": "ce"},
            "APGD-T-CE",
            f"APGD-T climbs the targeted cross-entropy toward {used} target classes (AutoAttack's ce-targeted loss; "
            f"its targeted DLR loss needs {DLR_TARGETED_MIN_CLASSES} logits)",
        )
    return ApgdPart(
        None,
        "APGD-CE",
        "APGD-T is APGD-CE (its one target is the other class, and its targeted loss takes cross-entropy's steps): "
        "apgd's run stands for it",
    )


# torchattacks' standard AutoAttack runs APGD-T and FAB-T toward classes - 1 targets with the targeted DLR loss
AUTOATTACK_MIN_CLASSES = DLR_TARGETED_MIN_CLASSES


def check_classes(threats: tuple[str, ...], num_classes: int) -> None:
    """Raise unless a model with ``num_classes`` outputs can be measured under ``threats``: 2 classes or more, and
    :data:`AUTOATTACK_MIN_CLASSES` for ``autoattack`` / ``aa_worst``."""
    if num_classes < 2:
        raise RobustError(f"the threat suite needs a model with 2 classes or more, this one has {num_classes}")
    asked = [k for k in AUTOATTACK_THREATS if k in threats]
    if asked and num_classes < AUTOATTACK_MIN_CLASSES:
        verb = "needs" if len(asked) == 1 else "need"
        raise RobustError(
            f"{' and '.join(asked)} {verb} a model with {AUTOATTACK_MIN_CLASSES} classes or more (torchattacks' "
            f"standard AutoAttack runs APGD-T, whose loss uses {DLR_TARGETED_MIN_CLASSES} logits), this one has "
            f"{num_classes}: leave out --autoattack; --square-queries 5000 adds AutoAttack's gradient-free part to "
            "pgd_worst"
        )


@contextmanager
def bn_mode(model: nn.Module, mode: Literal["eval", "train"]) -> Iterator[None]:
    """Put ``model`` in ``mode`` for the block, then restore its previous mode."""
    was_training = model.training
    model.train(mode == "train")
    try:
        yield
    finally:
        model.train(was_training)


APGD_TARGETS = 3  # APGD-T's target classes unless a spec says otherwise (AutoAttack's standard version uses 9)


def adaptations(
    num_classes: int, threats: Iterable[str] = DEFAULT_THREATS, apgd_targets: int = APGD_TARGETS
) -> dict[str, dict[str, str]]:
    """How ``threats`` (default: validation's) depart from AutoAttack's components on a model with ``num_classes``
    outputs (:func:`apgd_part`), for reports, logs and cards: ``{key: {"runs": its column's name, "note": a
    sentence}}``, empty where nothing departs (10 classes)."""
    parts = {key: apgd_part(key, num_classes, apgd_targets) for key in _ADAPTIVE if key in set(threats)}
    return {key: {"runs": part.name, "note": part.note} for key, part in parts.items() if part.note}


@dataclass(frozen=True)
class ThreatSpec:
    """What to measure: budget ``eps`` in pixel units in the threat model ``norm`` (``linf``: [0, 1]; ``l2``: >= 0,
    at most sqrt(C·H·W), checked against the images); PGD ``steps`` of ``alpha`` (default: :attr:`step`) with
    ``restarts`` random restarts (for ``pgd``, ``bpda_pgd``, the targeted attack and APGD); JPEG ``quality``;
    ``seed`` of random starts and targets; the ``threats`` (keys of :data:`THREATS`). ``early_exit``: attack only
    the examples still standing (default; False: every example, every step, for comparison); ``cascade``: run each
    worst case's parts on the survivors of the parts before (the module docstring says what the figures then
    mean); ``apgd_targets``: the target classes of ``apgd_t`` (AutoAttack's standard version uses 9);
    ``apgd_steps``/``apgd_restarts``: APGD's own (default PGD's; AutoAttack's standard APGD-CE runs 100 × 1);
    ``square_queries``: the queries of the ``square`` threat, which then joins ``pgd_worst`` (0: Square does not run;
    AutoAttack's standard version spends 5,000)."""

    eps: float
    alpha: float | None = None
    steps: int = 10
    restarts: int = 1
    quality: int = 75
    seed: int = 0
    threats: tuple[str, ...] = DEFAULT_THREATS
    norm: str = "linf"
    early_exit: bool = True
    cascade: bool = False
    apgd_targets: int = APGD_TARGETS
    apgd_steps: int | None = None
    apgd_restarts: int | None = None
    square_queries: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "threats", tuple(self.threats))
        check_norm(self.norm)
        check_budget(self.eps, self.step, self.steps, norm=self.norm)
        for name in ("restarts", "apgd_targets", "apgd_steps", "apgd_restarts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RobustError(f"{name} must be at least 1, got {value}")
        check_square_queries(self.square_queries)
        if "square" in self.threats and not self.square_queries:
            raise RobustError("the square threat needs its queries: square_queries (evaluate.py --square-queries N)")
        check_quality(self.quality)
        unknown = [k for k in self.threats if k not in THREATS]
        if unknown or not self.threats:
            raise RobustError(f"unknown threat(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(THREATS)}")

    @property
    def step(self) -> float:
        """The PGD step in force: ``alpha``, else the registry's evaluation step for ``eps`` (L∞ eps/4; L2
        2.5·eps/``steps``; :func:`robust.attacks.default_step`)."""
        return (
            default_step("pgd", self.eps, norm=self.norm, steps=self.steps) if self.alpha is None else float(self.alpha)
        )

    @property
    def apgd_settings(self) -> tuple[int, int]:
        """APGD's steps and restarts in force: ``apgd_steps`` and ``apgd_restarts``, else PGD's."""
        return self.apgd_steps or self.steps, self.apgd_restarts or self.restarts

    def parts(self, worst: str) -> tuple[str, ...]:
        """The parts of the worst case ``worst`` (a key of :data:`WORST_CASES`) in force, in cascade order:
        ``square`` only when this spec gives it queries."""
        return tuple(p for p in WORST_CASES[worst] if p != "square" or self.square_queries)

    def previous(self, key: str) -> str | None:
        """The part a cascade runs before ``key`` (``None`` for the first part of a worst case, or a threat in
        none)."""
        for worst in WORST_CASES:
            parts = self.parts(worst)
            if key in parts[1:]:
                return parts[parts.index(key) - 1]
        return None

    @property
    def mode(self) -> str:
        """How the worst cases' parts were measured, for reports: ``"cascade"`` (each on the survivors of the parts
        before it; its figure is the accuracy after all of them) or ``"independent"`` (each on every example)."""
        return "cascade" if self.cascade else "independent"

    def adaptations(self, num_classes: int) -> dict[str, dict[str, str]]:
        """How this spec's threats depart from AutoAttack's components on a model with ``num_classes`` outputs:
        :func:`adaptations` of the keys it computes."""
        return adaptations(num_classes, _wanted(self), self.apgd_targets)

    def for_batch(self, index: int) -> ThreatSpec:
        """This spec for the ``index``-th batch of a pass: seeded ``seed + index``, so batches differ and every
        pass repeats them."""
        return replace(self, seed=self.seed + index)


def _torchattacks_norm(norm: str) -> str:
    return {"linf": "Linf", "l2": "L2"}[check_norm(norm)]


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    restarts: int = 1,
    seed: int = 0,
    *,
    norm: str = "linf",
) -> Tensor:
    """APGD-CE (Croce & Hein 2020; :func:`robust.attacks.apgd`, torchattacks' arithmetic) seeded with ``seed`` under
    a fork of the RNG: ``N×C×H×W`` [0, 1] -> adversarial images within ``eps`` in ``norm`` (``linf`` or ``l2``);
    where it fails, or the model is already wrong, an image comes back unchanged."""
    with seeded_rng(seed, x.device):
        return _apgd(model, x, y, eps, steps, restarts=restarts, norm=norm)


def _torchattacks(name: str, model: nn.Module, x: Tensor, y: Tensor, spec: ThreatSpec, **kwargs) -> Tensor:
    """torchattacks' attack ``name`` (``Square``; AutoAttack goes through :func:`_autoattack`) at the spec's budget and
    seed (the caller forks the RNG), on ``x`` (``N×C×H×W`` in [0, 1]): adversarial images; an image it fails on comes
    back unchanged."""
    import torchattacks

    if len(x) == 0:
        return x.detach().clone()
    check_budget(spec.eps, norm=spec.norm, dims=x[0].numel())
    attack = getattr(torchattacks, name)(
        model, norm=_torchattacks_norm(spec.norm), eps=spec.eps, seed=spec.seed, **kwargs
    )
    return attack(x, y).detach()


def autoattack_components(model: nn.Module, spec: ThreatSpec, num_classes: int) -> list:
    """torchattacks' standard AutoAttack for ``model`` at ``spec``'s budget and seed, as its components in the order
    it runs them (each on the examples the ones before leave standing): ``[APGD (CE), APGDT, FAB (targeted),
    Square]``, with the steps, restarts, targets and queries torchattacks gives them."""
    import torchattacks

    reference = torchattacks.AutoAttack(
        model,
        norm=_torchattacks_norm(spec.norm),
        eps=spec.eps,
        version="standard",
        n_classes=num_classes,
        seed=spec.seed,
    )
    return list(reference._autoattack.attacks)


POOLED = "autoattack_pending"  # predictions(pool_autoattack=True): the examples left to finish_autoattack


def _autoattack(suite: _Suite, mask: Tensor, fallback: Tensor, num_classes: int, pool: bool) -> tuple[Tensor, Tensor]:
    """torchattacks' standard AutoAttack (:func:`autoattack_components`) on the ``mask`` examples the model gets
    right: ``N`` predictions, ``fallback`` outside ``mask`` (the clean one where it is wrong), and the examples still
    standing (none unless ``pool``: then FAB-T and Square are left to :func:`finish_autoattack`).

    Its APGD-CE and APGD-T are :func:`robust.attacks.apgd_run` with torchattacks' settings, and where the suite ran
    ``apgd`` or ``apgd_t`` with those settings, their verdicts stand for them, as the same runs would give them again
    (an example's run does not depend on the others, and in a cascade the examples here survived both): only the
    targets ``apgd_t`` did not try, then FAB-T and Square (torchattacks' own) run. Our APGD draws its random starts
    for the whole batch, torchattacks' for the examples it attacks, so an example can fall here where torchattacks'
    own run keeps it, or the other way (``docs/benchmarks.md`` measures the difference)."""
    model, x, y, spec, preds = suite.model, suite.x, suite.y, suite.spec, suite.preds
    ce, targeted, *tail = autoattack_components(model, spec, num_classes)
    out = fallback.clone()
    standing = mask & (preds["clean"] == y)
    out[mask & ~standing] = preds["clean"][mask & ~standing]

    def fall(pred: Tensor) -> None:
        won = standing & (pred != y)
        out[won] = pred[won]
        standing[won] = False

    def run(steps: int, restarts: int, **kwargs) -> Tensor:
        with suite.seeded():
            return apgd_run(
                model,
                x,
                y,
                spec.eps,
                steps,
                seek=standing,
                full=suite.nobody,
                restarts=restarts,
                norm=spec.norm,
                **kwargs,
            ).pred

    same_ce = spec.apgd_settings == (ce.steps, ce.n_restarts) and ce.loss == "ce"
    fall(preds["apgd"] if same_ce and "apgd" in preds else run(ce.steps, ce.n_restarts))
    tried = 0
    part = apgd_part("apgd_t", num_classes, spec.apgd_targets).kwargs
    if "apgd_t" in preds and spec.apgd_settings == (targeted.steps, targeted.n_restarts) and set(part) == {"targets"}:
        fall(preds["apgd_t"])
        tried = part["targets"]
    if tried < targeted.n_target_classes:
        fall(run(targeted.steps, targeted.n_restarts, targets=targeted.n_target_classes, skip_targets=tried))
    if pool:
        return out, standing
    return _autoattack_tail(model, spec, tail, x, y, standing, out), suite.nobody


def _autoattack_tail(
    model: nn.Module, spec: ThreatSpec, tail: list, x: Tensor, y: Tensor, standing: Tensor, out: Tensor
) -> Tensor:
    """AutoAttack's ``tail`` (its FAB-T and Square, torchattacks', one after the other, seeded with ``spec.seed``) on
    the ``standing`` examples of ``x`` (``N×C×H×W`` in [0, 1]): ``out`` (``N`` predictions) with theirs."""
    if not standing.any():
        return out
    import torchattacks

    check_budget(spec.eps, norm=spec.norm, dims=x[0].numel())
    with seeded_rng(spec.seed, x.device):
        made = torchattacks.MultiAttack(tail)(x[standing], y[standing]).detach()
    return _predict(model, made, standing, out)


def finish_autoattack(
    model: nn.Module, spec: ThreatSpec, num_classes: int, batches: list[tuple[Tensor, Tensor, dict]]
) -> None:
    """AutoAttack's FAB-T and Square, at once, on every example that :func:`predictions` with ``pool_autoattack``
    left standing in ``batches`` (``(x, y, its predictions)``), seeded with ``spec.seed``: completes each batch's
    ``autoattack`` and ``aa_worst`` in place. Both attacks cost per iteration whatever the batch, so one pool of
    several batches' survivors runs faster than each batch's alone, with the same arithmetic per example."""
    standing = [preds.pop(POOLED, None) for _, _, preds in batches]
    if all(s is None for s in standing):
        return
    x = torch.cat([xb[s] for (xb, _, _), s in zip(batches, standing, strict=True)])
    y = torch.cat([yb[s] for (_, yb, _), s in zip(batches, standing, strict=True)])
    everyone = torch.ones(len(y), dtype=torch.bool, device=y.device)
    tail = autoattack_components(model, spec, num_classes)[2:]
    made = _autoattack_tail(model, spec, tail, x, y, everyone, y.clone())
    for (_, yb, preds), s, part in zip(batches, standing, made.split([int(s.sum()) for s in standing]), strict=True):
        new = yb.clone()
        new[s] = part
        fooled = new != yb
        if "autoattack" in preds:
            preds["autoattack"][fooled] = new[fooled]
        if "aa_worst" in preds:  # AutoAttack is its last part: it changes where every part before stood
            worst = fooled & (preds["aa_worst"] == yb)
            preds["aa_worst"][worst] = new[worst]


def worst_case(y: Tensor, parts: list[Tensor]) -> Tensor:
    """Per-example worst case of several threats' predictions (each ``N``): ``y`` where every part is correct,
    else the first wrong part's prediction."""
    worst = y
    for part in reversed(parts):
        worst = torch.where(part != y, part, worst)
    return worst


def _wanted(spec: ThreatSpec) -> set[str]:
    """The keys to compute for ``spec``: those asked, the parts of the worst cases asked and, in a cascade, every
    part before a part asked (a part's figure is measured on its predecessors' survivors)."""
    wanted = set(spec.threats)
    for key in WORST_CASES:
        if key in wanted:
            wanted.update(spec.parts(key))
    if spec.cascade:
        for key in list(wanted):
            while (key := spec.previous(key)) is not None:
                wanted.add(key)
    return wanted


def _predict(model: nn.Module, chosen: Tensor, mask: Tensor, fallback: Tensor, quality: int | None = None) -> Tensor:
    """``fallback`` (``N`` class ids) with, where ``mask`` holds, the model's predictions on ``chosen`` (the
    ``mask.sum()`` images of those examples, through JPEG of ``quality`` when given): one forward, masked images
    only."""
    out = fallback.clone()
    if len(chosen):
        with torch.no_grad():
            out[mask] = model(jpeg(chosen, quality) if quality is not None else chosen).argmax(1)
    return out


class _Suite:
    """One :func:`predictions` call: the spec, the batch, and the predictions made so far (``preds``)."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, spec: ThreatSpec) -> None:
        self.model, self.x, self.y, self.spec = model, x, y, spec
        self.fast = spec.early_exit
        self.everyone = torch.ones(len(y), dtype=torch.bool, device=x.device)
        self.nobody = torch.zeros_like(self.everyone)
        self.preds: dict[str, Tensor] = {}

    def seeded(self):
        return seeded_rng(self.spec.seed, self.x.device)

    def run(self, engine, model: nn.Module, y: Tensor, attack: Tensor, transfer: Tensor | None = None, **kwargs):
        """``engine`` (:func:`robust.attacks.pgd_run` or :func:`robust.attacks.apgd_run`) on ``model``, seeded: the
        ``attack`` examples with early exit (all steps when early exit is off), the ``transfer`` ones all steps."""
        s = self.spec
        seek, full = (attack, self.nobody) if self.fast else (self.nobody, attack)
        if transfer is not None:
            full = full | transfer
        steps, restarts = s.steps, s.restarts
        if engine is pgd_run:
            kwargs["alpha"] = s.step
        else:
            steps, restarts = s.apgd_settings
        with self.seeded():
            return engine(
                model, self.x, y, eps=s.eps, steps=steps, seek=seek, full=full, restarts=restarts, norm=s.norm, **kwargs
            )

    def gate(self, key: str) -> tuple[Tensor, Tensor]:
        """The examples ``key``'s attack must run on, and the predictions of the others: with early exit, those
        the (defended, for the threats through JPEG) model gets wrong keep its clean prediction; in a cascade,
        those an earlier part fooled keep that part's prediction."""
        y = self.y
        base = self.preds["jpeg" if key in _THROUGH_JPEG else "clean"] if self.fast else y
        mask = base == y if self.fast else self.everyone
        previous = self.spec.previous(key) if self.spec.cascade else None
        if previous is None:
            return mask, base
        return mask & (self.preds[previous] == y), self.preds[previous]

    def attacked(self, key: str, run, mask: Tensor, fallback: Tensor, quality: int | None = None) -> Tensor:
        """``key``'s predictions from a PGD run: the early-exit verdicts as they are, else a forward on the final
        iterates (through JPEG of ``quality`` when given)."""
        if self.fast and key != "jpeg_pgd":
            return torch.where(mask, run.pred, fallback)
        return _predict(self.model, run.last[mask], mask, fallback, quality)


def predictions(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    spec: ThreatSpec,
    target: Tensor | None = None,
    pool_autoattack: bool = False,
) -> dict:
    """Predictions (``N`` class ids) of ``model`` under each threat of ``spec``, plus ``"target"`` (the targets,
    when ``targeted_success`` is asked for: ``target``, else a random other class per example).

    ``x``: ``N×C×H×W`` in [0, 1]; ``y``: ``N`` true labels. Only the attacks the asked keys need run (worst cases
    run their parts; a cascade part runs the parts before it), each with the model in eval mode under its own fork
    of the RNG seeded with ``spec.seed``: a key's figure does not depend on which other keys were asked for, and the
    caller's RNG and model mode are left as they were. With ``spec.early_exit`` only the examples still standing
    are attacked (the module docstring); with ``spec.cascade`` the worst cases' parts are measured on survivors.
    ``pool_autoattack``: leave AutoAttack's FAB-T and Square to :func:`finish_autoattack`, which runs them on the
    survivors of several batches at once; ``autoattack`` and ``aa_worst`` are then final only after it, and the
    result holds the examples still standing under :data:`POOLED`.
    """
    wanted = _wanted(spec)
    suite = _Suite(model, x, y, spec)
    preds, fast, q = suite.preds, spec.early_exit, spec.quality
    draw_target = "targeted_success" in wanted and target is None
    num_classes = None
    with bn_mode(model, "eval"), torch.enable_grad():
        if (
            draw_target
            or wanted & {"clean", "autoattack", *_ADAPTIVE}
            or (fast and wanted & (set(_ATTACKED) - set(_THROUGH_JPEG)))
        ):
            with torch.no_grad():
                logits = model(x)
            num_classes, preds["clean"] = logits.shape[1], logits.argmax(1)
            check_classes(tuple(wanted), num_classes)
        if "jpeg" in wanted or (fast and wanted & set(_THROUGH_JPEG)):
            preds["jpeg"] = _predict(model, x, suite.everyone, y, q)
        if draw_target:
            with suite.seeded():
                target = random_other_class(y, num_classes)

        # One FGSM image serves the bare model and the transfer through JPEG.
        gates = {k: suite.gate(k) for k in ("fgsm", "jpeg_fgsm") if k in wanted}
        if gates:
            with suite.seeded():
                made = fgsm(
                    model, x, y, spec.eps, norm=spec.norm, active=torch.stack([m for m, _ in gates.values()]).any(0)
                )
            for key, (mask, fallback) in gates.items():
                preds[key] = _predict(model, made[mask], mask, fallback, q if key == "jpeg_fgsm" else None)

        # One PGD run serves both: early exit for the bare model, all steps for the transfer through JPEG.
        gates = {k: suite.gate(k) for k in ("pgd", "jpeg_pgd") if k in wanted}
        if gates:
            bare, transfer = gates.get("pgd", (suite.nobody,))[0], gates.get("jpeg_pgd", (suite.nobody,))[0]
            run = suite.run(pgd_run, model, y, bare, transfer=transfer)
            for key, (mask, fallback) in gates.items():
                preds[key] = suite.attacked(key, run, mask, fallback, q if key == "jpeg_pgd" else None)

        if "apgd" in wanted:
            mask, fallback = suite.gate("apgd")
            preds["apgd"] = suite.attacked("apgd", suite.run(apgd_run, model, y, mask), mask, fallback)

        for key in _ADAPTIVE:
            if key not in wanted:
                continue
            mask, fallback = suite.gate(key)
            kwargs = apgd_part(key, num_classes, spec.apgd_targets).kwargs
            if kwargs is None and "apgd" in preds:
                # APGD-CE's own steps: on the same examples (in a cascade, its survivors, which it fails on again:
                # an example's start and steps do not depend on the others) it gives apgd's predictions.
                preds[key] = preds["apgd"]
                continue
            run = suite.run(apgd_run, model, y, mask, **(kwargs or {}))
            preds[key] = suite.attacked(key, run, mask, fallback)
            if kwargs is None:
                preds["apgd"] = preds[key]  # for the next part; "apgd" is returned only when asked

        if "square" in wanted:
            mask, fallback = suite.gate("square")
            with suite.seeded():
                made = _torchattacks("Square", model, x[mask], y[mask], spec, n_queries=spec.square_queries)
            preds["square"] = _predict(model, made, mask, fallback)

        if "bpda_pgd" in wanted:
            mask, fallback = suite.gate("bpda_pgd")
            run = suite.run(pgd_run, JpegDefended(model, q, straight_through=True), y, mask)
            preds["bpda_pgd"] = suite.attacked("bpda_pgd", run, mask, fallback, q)

        if "autoattack" in wanted:
            preds["autoattack"], pending = _autoattack(suite, *suite.gate("autoattack"), num_classes, pool_autoattack)

        if "targeted_success" in wanted:
            # An example the model already puts in the target class has succeeded: it is not attacked.
            mask = preds["clean"] != target if fast else suite.everyone
            run = suite.run(pgd_run, model, target, mask, targeted=True)
            preds["targeted_success"] = suite.attacked("targeted_success", run, mask, preds.get("clean", y))

    for key in WORST_CASES:
        if key in wanted:
            preds[key] = worst_case(y, [preds[p] for p in spec.parts(key)])
    out = {k: preds[k] for k in spec.threats}
    if "targeted_success" in wanted:
        out["target"] = target
    if pool_autoattack and "autoattack" in wanted:
        out[POOLED] = pending
    return out


def val_tag(key: str, norm: str) -> str:
    """The logged name of threat ``key``'s validation accuracy: ``val/<key>`` in L∞, ``val/l2/<key>`` in L2, so no
    figure can be read in the wrong norm."""
    return f"val/{key}" if norm == "linf" else f"val/{norm}/{key}"


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
