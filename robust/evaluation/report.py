"""Robustness report: every threat of the design on the same images, for a list of eps, as one JSON-native dict.

:func:`evaluate` measures accuracies in [0, 1] under the keys of :data:`robust.threats.THREATS`
(``targeted_success`` is the fraction of images pushed to a random other class, so lower is better there;
``pgd_worst`` and ``jpeg_worst`` are the per-example worst cases, the figures to claim), shardable over processes
and resumable (:mod:`robust.evaluation.sharding`). :func:`model_identity` says which model was measured and
:func:`build_report` joins the figures with the model's and the data's identity
(:func:`robust.data.eval_data.eval_data`).
Rendering and writing the files is :mod:`robust.evaluation.render`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from robust.data.images import check_images
from robust.errors import RobustError
from robust.evaluation.render import honesty_flags
from robust.evaluation.sharding import Journal, World, sharded_counts
from robust.fast_path import fast_model
from robust.files import sha256_path
from robust.learned import not_learned
from robust.models.build import card_of
from robust.models.hf import HF_PREFIX
from robust.threats import (
    AUTOATTACK_THREATS,
    DEFAULT_THREATS,
    THREATS,
    ThreatSpec,
    bn_mode,
    check_classes,
    correct_counts,
    finish_autoattack,
    predictions,
)

# AutoAttack's FAB-T and Square cost per iteration whatever the batch: they run on the survivors of a group of
# batches holding this many images at once (docs/benchmarks.md measures it)
AUTOATTACK_POOL = 512


def evaluate(
    model: nn.Module,
    loader: DataLoader | Sequence[tuple[Tensor, Tensor]],
    eps_list: Sequence[float],
    steps: int = 10,
    alpha: float | None = None,
    restarts: int = 1,
    quality: int = 75,
    autoattack: bool = False,
    seed: int = 0,
    progress: bool = True,
    world: World | None = None,
    journal: Journal | None = None,
    threats: Sequence[str] | None = None,
    norm: str = "linf",
    apgd_steps: int | None = None,
    apgd_restarts: int | None = None,
    early_exit: bool = True,
    cascade: bool = False,
    square_queries: int = 0,
    fast_path: bool = True,
) -> dict:
    """Accuracy of ``model`` under every threat, on the same images, for each eps.

    Args:
        model: takes ``N×3×H×W`` images in [0, 1], returns logits; evaluated with BatchNorm in eval mode.
        loader: a DataLoader or a list of batches ``(x, y)``: ``x`` float in [0, 1], ``y`` int64 class ids of
            ``model``.
        eps_list: L-inf budgets in [0, 1] pixel units. steps, restarts: PGD iterations and random restarts
            (for ``pgd``, ``apgd``, ``bpda_pgd`` and the targeted attack). alpha: PGD step (default
            :func:`robust.attacks.default_step`: L∞ eps/4, L2 2.5·eps/steps).
        quality: JPEG quality of the defense. autoattack: also run torchattacks' standard AutoAttack (slow; its
            APGD-CE and APGD-T reuse the suite's runs where their settings agree, and its FAB-T and Square run on the
            survivors of groups of batches holding :data:`AUTOATTACK_POOL` images: the journal's unit is the group).
        threats: the keys of :data:`robust.threats.THREATS` to measure (default every one but ``autoattack``;
            ``autoattack`` and ``aa_worst`` are added by ``autoattack``), in :data:`THREATS` order.
        early_exit: attack only the images still standing (:class:`robust.threats.ThreatSpec`); cascade: measure each
            worst case's parts on the survivors of the parts before (the report then says so).
        norm: the threat model, ``linf`` or ``l2`` (eps in its units). apgd_steps, apgd_restarts: APGD-CE's own
            (default ``steps`` and ``restarts``; AutoAttack's standard APGD-CE is 100 × 1). square_queries: also run
            Square with this many queries (the ``square`` threat, a part of ``pgd_worst``; 0: not run).
        seed: seeds random starts and the random targets (batch ``i`` with ``seed + i``; the global RNG is left
            untouched).
        fast_path: attack :func:`robust.fast_path.fast_model`'s frozen, folded copy of ``model`` (the same figures
            within float rounding, faster; built once per call); False attacks ``model`` itself, for debugging.
        world: the processes sharing the batches (:func:`robust.evaluation.sharding.launch`; default this process
        alone, on
            the model's device); every process gets the same result. journal: where finished batches' counts are
            kept and, when resuming, read back (:class:`robust.evaluation.sharding.Journal`).
    Returns: ``{"rows": [{"eps", "alpha", <threat>: accuracy in [0, 1], ...}, ...], "flags": [...], "n",
    "eps", "steps", "restarts", "alpha", "quality", "seed", "autoattack", "num_classes", "adapted", ...}``; rows sorted
    by eps; ``adapted``: how the threats departed from AutoAttack's components at the model's class count
    (:meth:`robust.threats.ThreatSpec.adaptations`). Accuracies are counts of correct predictions over ``n``, whatever
    the number of processes.
    """
    eps_list = sorted({float(e) for e in eps_list})
    if not eps_list:
        raise RobustError("give at least one eps")
    asked = set(threats or DEFAULT_THREATS) | (set(AUTOATTACK_THREATS) if autoattack else set())
    asked |= {"square"} if square_queries and not threats else set()
    keys = tuple(k for k in THREATS if k in asked)
    if asked - set(keys):
        raise RobustError(f"unknown threat(s) {', '.join(sorted(asked - set(keys)))}; known: {', '.join(THREATS)}")
    specs = [
        ThreatSpec(
            e,
            alpha,
            steps,
            restarts,
            quality,
            seed,
            keys,
            norm=norm,
            apgd_steps=apgd_steps,
            apgd_restarts=apgd_restarts,
            early_exit=early_exit,
            cascade=cascade,
            square_queries=square_queries,
        )
        for e in eps_list
    ]
    world = world or World(next(model.parameters()).device)
    num_classes = class_count(model, loader, world.device)
    check_classes(keys, num_classes)  # before the pass: autoattack on too few classes is one line, at once
    if fast_path:
        model = fast_model(model)
    pool = bool(set(keys) & set(AUTOATTACK_THREATS))
    count = partial(batch_counts, model, keys, world.device, num_classes if pool else None)
    group = max(1, AUTOATTACK_POOL // batch_size(loader)) if pool else 1
    totals = sharded_counts(loader, specs, count, 1 + len(keys), world, journal, progress, group).tolist()
    n = totals[0][0]
    if n == 0:
        raise RobustError("the evaluation data holds no images")
    rows = [
        {"eps": s.eps, "alpha": s.step, **{k: c / n for k, c in zip(keys, t[1:], strict=True)}}
        for s, t in zip(specs, totals, strict=True)
    ]
    return {
        "rows": rows,
        "flags": honesty_flags(rows, n, norm, cascade),
        "n": n,
        "eps": eps_list,
        "steps": int(steps),
        "restarts": int(restarts),
        "alpha": alpha,
        "quality": int(quality),
        "seed": int(seed),
        "autoattack": bool(autoattack),
        "norm": norm,
        "apgd_steps": apgd_steps or int(steps),
        "apgd_restarts": apgd_restarts or int(restarts),
        "mode": specs[0].mode,
        "early_exit": bool(early_exit),
        "square_queries": int(square_queries),
        "fast_path": bool(fast_path),
        "num_classes": num_classes,
        "adapted": specs[0].adaptations(num_classes),
        "not_learned": not_learned(rows[0].get("clean"), num_classes),
    }


def class_count(model: nn.Module, loader: DataLoader | Sequence[tuple[Tensor, Tensor]], device: torch.device) -> int:
    """The model's outputs: its card's ``num_classes``, else the logits' width on one image of the first batch (eval
    mode, no gradient)."""
    card = card_of(model)
    if card is not None:
        return card.num_classes
    batch = next(iter(loader), None)
    if batch is None:
        raise RobustError("the evaluation data holds no images")
    with bn_mode(model, "eval"), torch.no_grad():
        return int(model(batch[0][:1].to(device)).shape[1])


def batch_size(loader: DataLoader | Sequence[tuple[Tensor, Tensor]]) -> int:
    """The images per batch of ``loader``: a DataLoader's ``batch_size`` (or its batch sampler's first batch), else the
    first batch's; 1 for no batch."""
    if isinstance(loader, DataLoader):
        return loader.batch_size or len(next(iter(loader.batch_sampler), ())) or 1
    return len(loader[0][1]) if len(loader) else 1


def batch_counts(
    model: nn.Module,
    keys: tuple[str, ...],
    device: torch.device,
    num_classes: int | None,
    g: int,
    batches: list[tuple[int, Tensor, Tensor]],
    specs: list[ThreatSpec],
) -> Tensor:
    """Group ``g`` of a pass, ``[(b, x, y), ...]`` (``x`` in [0, 1], ``y`` class ids; batch ``b`` seeded
    ``spec.for_batch(b)``), under each of ``specs``: ``len(specs)×(1 + len(keys))`` int64, the images then the correct
    predictions of each of ``keys``. With ``num_classes`` given, AutoAttack's FAB-T and Square run once per spec on
    the survivors of the whole group (:func:`robust.threats.finish_autoattack`)."""
    batches = [(b, x.to(device), y.to(device)) for b, x, y in batches]
    for _, x, _ in batches:
        check_images(x)
    rows = []
    for spec in specs:
        done = [
            (x, y, predictions(model, x, y, spec.for_batch(b), pool_autoattack=bool(num_classes)))
            for b, x, y in batches
        ]
        if num_classes:
            finish_autoattack(model, spec.for_batch(batches[0][0]), num_classes, done)
        counts = [correct_counts(preds, y, keys) for _, y, preds in done]
        rows.append([sum(len(y) for _, y, _ in done), *map(sum, zip(*counts, strict=True))])
    return torch.tensor(rows, dtype=torch.int64)


def model_identity(spec: str | Path, model: nn.Module) -> dict:
    """Which model was evaluated: the spec, and for a file or folder (a checkpoint, an export, a local Hugging Face
    model) its absolute path and sha256; arch and card. ``imagenet`` is torchvision's fixed published weights."""
    card = card_of(model)
    text = str(spec)
    info = {"spec": text, "arch": None if card is None else card.arch, "card": None if card is None else card.to_dict()}
    path = None if text == "imagenet" else Path(text.removeprefix(HF_PREFIX))
    if path is not None and path.exists():
        info.update(path=str(path.resolve()), sha256=sha256_path(path))
    return info


def build_report(results: dict, model_info: dict, data_info: dict) -> dict:
    """The full report: the figures of :func:`evaluate` plus model and data identity, as JSON-native values."""
    import torchvision

    report = {
        **results,
        "model": model_info,
        "data": data_info,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }
    return json.loads(json.dumps(report))
