"""Resuming a run (``train.py fit --ckpt_path last``) without surprises.

- :func:`run_folder`: the version folder a resume continues (the latest one with a ``last.ckpt`` for ``last``).
- :func:`config_differences` / :func:`check_resume_config`: the run is continued only with the settings it was trained
  with (Lightning saved them as ``config.yaml`` in its version folder), except its length (:data:`RUN_LENGTH`);
  anything else is one line naming the differing keys, unless ``--accept_config_changes true``.
- :class:`RunLengthSchedule`: a learning-rate schedule restored from the checkpoint was built for the old run length;
  extending the run (more epochs, other batch counts) would step a one-cycle schedule past its end (torch's
  ``ValueError: Tried to step N times``). The schedule is rebuilt for the new length, as if the run had been
  configured that way from the start, and one line says so.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import CosineAnnealingLR, OneCycleLR

from robust.errors import RobustError
from robust.optim import RunFraction

# How long a run is: may differ between a run and its resume.
RUN_LENGTH = ("trainer.max_epochs", "trainer.max_steps", "trainer.min_epochs", "trainer.min_steps", "trainer.max_time")
# Not settings of the run: where it resumes from, where its folder is (it may have moved), how the console looks.
NOT_SETTINGS = (
    "config",
    "ckpt_path",
    "accept_config_changes",
    "trainer.logger.init_args.version",
    "trainer.logger.init_args.save_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)
ACCEPT_FLAG = "--accept_config_changes true"


def run_folder(root: Path, ckpt_path: str | None) -> Path | None:
    """The version folder a resume from ``ckpt_path`` continues: for ``last``, the latest ``root/version_N`` holding
    ``checkpoints/last.ckpt`` (an error when there is none); for a checkpoint file in a ``checkpoints`` folder,
    that folder's parent; else None (a fresh run, or a checkpoint from elsewhere)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        runs = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: _version(p.parts[-3]))
        if not runs:
            raise RobustError(f"--ckpt_path last: no last.ckpt under {root}/version_*/checkpoints to resume from")
        return runs[-1].parents[1]
    path = Path(ckpt_path)
    return path.parents[1] if path.parent.name == "checkpoints" else None


def _version(name: str) -> int:
    try:
        return int(name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and other values are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(saved: dict, given: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs (``{key: (saved, given)}``), except the run length and
    what is not a setting of the run (:data:`RUN_LENGTH`, :data:`NOT_SETTINGS`); a key missing on one side counts
    as ``None`` there."""
    old, new = flatten(saved), flatten(given)
    skip = RUN_LENGTH + NOT_SETTINGS
    keys = [k for k in dict.fromkeys([*old, *new]) if not any(k == s or k.startswith(s + ".") for s in skip)]
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_resume_config(folder: Path, given: dict, accept: bool) -> str | None:
    """Compare the config a run in ``folder`` was trained with (its ``config.yaml``) with ``given``: an error naming
    the differing keys, unless ``accept``; then, or when nothing but the run length differs, a one-line notice
    (None when nothing differs or ``folder`` has no saved config)."""
    saved_path = folder / "config.yaml"
    if not saved_path.is_file():
        return None
    saved = yaml.safe_load(saved_path.read_text()) or {}
    differing = config_differences(saved, given)
    lengths = {k: (flatten(saved).get(k), flatten(given).get(k)) for k in RUN_LENGTH}
    longer = [f"{k.split('.')[-1]} {a} -> {b}" for k, (a, b) in lengths.items() if a != b]
    if differing and not accept:
        listed = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in differing.items())
        raise RobustError(
            f"resuming {folder}, trained with other settings: {listed}; drop these overrides to "
            f"continue it as it was, or pass {ACCEPT_FLAG} to continue it with the new ones"
        )
    changes = [*longer, *(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in differing.items())]
    return f"resuming {folder} with {', '.join(changes)}" if changes else None


class RunLengthSchedule(L.Callback):
    """On a resumed run, rebuild learning-rate schedules restored from the checkpoint for this run's length.

    A ``OneCycleLR``, ``CosineAnnealingLR`` or :class:`robust.optim.RunFraction` (``Cyclic``, ``Piecewise``) is built
    for the number of steps the run had when it started; the checkpoint keeps that number. When a resume trains for
    another number (``--trainer.max_epochs 12`` after 10, another batch count), the schedule is recomputed for the
    new total with the same shape (``pct_start``, three-phase, annealing, milestones as fractions), the learning rate
    set to the rebuilt schedule's value at the current step, and one line printed. Without this, a one-cycle schedule
    stepped past its end raises torch's ``ValueError``."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        for config in trainer.lr_scheduler_configs:
            total = int(trainer.estimated_stepping_batches) if config.interval == "step" else trainer.max_epochs
            if total is None or total < 1:
                continue
            notice = rebuild_schedule(config.scheduler, total)
            if notice:
                rank_zero_info(notice)


def rebuild_schedule(scheduler: Any, total: int) -> str | None:
    """Rebuild ``scheduler`` (``OneCycleLR``, ``CosineAnnealingLR`` or a :class:`robust.optim.RunFraction`) in place
    for ``total`` steps, keeping its step count and shape; the optimizer's learning rates become the rebuilt schedule's
    at the current step. Returns a one-line notice, or None when the schedule already fits (or is of another kind,
    or the run is already past ``total``)."""
    step = scheduler.last_epoch
    if isinstance(scheduler, OneCycleLR):
        old = scheduler.total_steps
        if old == total or step > total:
            return None
        phases = scheduler._schedule_phases
        pct = (phases[0]["end_step"] + 1) / old
        ends = [pct * total - 1, 2 * pct * total - 2, total - 1] if len(phases) == 3 else [pct * total - 1, total - 1]
        for phase, end in zip(phases, ends, strict=True):
            phase["end_step"] = float(end)
        scheduler.total_steps = total
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns when get_lr() is called outside step()
            lrs = scheduler.get_lr()  # also sets the cycled momentum of each group
        name = "one-cycle"
    elif isinstance(scheduler, CosineAnnealingLR):
        old = scheduler.T_max
        if old == total or step > total:
            return None
        scheduler.T_max = total
        lrs = [
            scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * step / total)) / 2
            for base in scheduler.base_lrs
        ]
        name = "cosine"
    elif isinstance(scheduler, RunFraction):
        old = scheduler.total_steps
        if old == total or step > total:
            return None
        scheduler.total_steps = total
        lrs = [base * scheduler.factor(step) for base in scheduler.base_lrs]
        name = scheduler.name
    else:
        return None
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return (
        f"resume: the {name} learning-rate schedule was built for {old} steps; rebuilt for this run's {total} "
        f"(at step {step}, lr {float(lrs[0]):.4g})"
    )
