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

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR

from robust.errors import RobustError
from robust.moved import current_path
from robust.training.optim import SchedulerFactory

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
    old = {k: current_path(v) if isinstance(v, str) else v for k, v in flatten(saved).items()}
    new = flatten(given)
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

    A schedule of the module's factory (``lr_scheduler``: ``OneCycle``, ``Cyclic``, ``Cosine``, ``Piecewise``, any
    whose ``total_steps`` is the run's length) is built for the number of steps the run had when it started; the
    checkpoint keeps that number. When a resume trains for another number (``--trainer.max_epochs 12`` after 10,
    another batch count), the factory builds the schedule for the new total and it is stepped to the current step, as
    if the run had been configured that way from the start, and one line says so. Without this, a one-cycle schedule
    stepped past its end raises torch's ``ValueError``."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        factory = getattr(pl_module, "lr_scheduler", None)
        if trainer.ckpt_path is None or factory is None:
            return
        for config in trainer.lr_scheduler_configs:
            total = int(trainer.estimated_stepping_batches) if config.interval == "step" else trainer.max_epochs
            if total is None or total < 1:
                continue
            rebuilt = rebuild_schedule(config.scheduler, factory, total)
            if rebuilt:
                config.scheduler, notice = rebuilt
                rank_zero_info(notice)


def rebuild_schedule(scheduler: LRScheduler, factory: SchedulerFactory, total: int) -> tuple[LRScheduler, str] | None:
    """``factory(optimizer, total)`` stepped to ``scheduler``'s step, and a one-line notice; the optimizer's learning
    rates (and a one-cycle's momentum) become the new schedule's at that step. None when ``scheduler`` already fits,
    has no ``total_steps``, or the run is already past ``total``."""
    step, old = scheduler.last_epoch, getattr(scheduler, "total_steps", None)
    if old is None or old == total or step > total:
        return None
    rebuilt = factory(scheduler.optimizer, total)
    rebuilt.last_epoch = step - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "step() before optimizer.step()": this step only moves the count
        rebuilt.step()
    name = getattr(rebuilt, "name", "one-cycle" if isinstance(rebuilt, OneCycleLR) else type(rebuilt).__name__)
    lr = rebuilt.get_last_lr()[0]
    return rebuilt, (
        f"resume: the {name} learning-rate schedule was built for {old} steps; rebuilt for this run's {total} "
        f"(at step {step}, lr {float(lr):.4g})"
    )
