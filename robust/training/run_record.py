"""The run record a checkpoint of :class:`robust.training.module.AdversarialClassifier` keeps besides weights and
optimizer state, written by :class:`RunRecord` (a callback the module brings to any Trainer through its
``configure_callbacks``).

A checkpoint holds, under these keys:

- :data:`robust.models.card.CARD_KEY`: the :class:`robust.models.card.ModelCard` (``ModelCard.to_dict()``) built by
  :func:`robust.models.card.training_card` from the module's hyper-parameters with what is in force when saving
  (``AdversarialClassifier.in_force``: the attack and step the overfitting guard may have changed, the steps, beta,
  the initial weights' record), the EMA decay, the global seed, the optimizer and schedule
  (:func:`optimization_record`), the data's description, the latest ``val/*`` figures and the monitored best score;
- ``rng_torch`` (and ``rng_cuda`` where CUDA is available): the RNG states, so a resumed run draws the same
  shuffles and random starts (bit-identical after a SIGKILL).

On resume the module takes back what it had in force from the card itself (``AdversarialClassifier.resume_in_force``);
:class:`RunRecord` takes back the RNG states, and gives each DDP process its own stream when training starts
(:func:`split_rng_by_rank`).
"""

from __future__ import annotations

import inspect
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from robust.learned import not_learned
from robust.models.card import CARD_KEY, ModelCard, training_card
from robust.threats import adaptations, val_tag
from robust.training.averaging import EMA_DECAY_KEY
from robust.training.guard import CatastrophicOverfittingGuard

RNG_TORCH, RNG_CUDA = "rng_torch", "rng_cuda"  # the checkpoint keys of the RNG states


class RunRecord(Callback):
    """Puts the card of the run so far and the RNG states in every checkpoint, takes the RNG states back on resume,
    and splits the RNG stream by DDP rank when training starts. Runs after :class:`~robust.training.averaging.WeightEMA`
    (a model callback comes after the Trainer's), whose decay it records."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        split_rng_by_rank(trainer.global_rank, trainer.world_size)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CARD_KEY] = run_card(trainer, pl_module, checkpoint).to_dict()
        checkpoint[RNG_TORCH] = torch.get_rng_state()
        if torch.cuda.is_available():
            checkpoint[RNG_CUDA] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if RNG_TORCH in checkpoint:
            torch.set_rng_state(checkpoint[RNG_TORCH])
        if RNG_CUDA in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint[RNG_CUDA])


def watching(callback, module: L.LightningModule) -> bool:
    """Whether ``callback`` is an overfitting guard that watches ``module``'s training."""
    return isinstance(callback, CatastrophicOverfittingGuard) and callback.active(module)


def run_card(trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> ModelCard:
    """The card of ``module`` (an :class:`~robust.training.module.AdversarialClassifier`) as ``trainer`` stands:
    its hyper-parameters with what is in force (defaults resolved, guard changes kept; the EMA decay is the one
    :class:`robust.training.averaging.WeightEMA` put in ``checkpoint``), the data module's description, the latest
    ``val/*`` figures and the monitored checkpoint callback's best score."""
    datamodule = getattr(trainer, "datamodule", None)
    monitored = next((cb for cb in trainer.checkpoint_callbacks if cb.monitor), None)
    score = None if monitored is None else monitored.best_model_score
    if hasattr(monitored, "real_score"):  # robust.training.checkpointing.BestCheckpoint: the measured value
        score = monitored.real_score()
    hp = module.hparams
    in_force = module.in_force()
    values = {
        **hp,
        **in_force,
        "ema_decay": checkpoint.get(EMA_DECAY_KEY),
        "seed": None if os.environ.get("PL_GLOBAL_SEED") is None else int(os.environ["PL_GLOBAL_SEED"]),
        "guard": next((cb.card_record() for cb in trainer.callbacks if watching(cb, module)), None),
        **optimization_record(trainer),
    }
    card = training_card(
        values,
        datamodule.describe() if hasattr(datamodule, "describe") else None,
        trainer.callback_metrics,
        alpha=in_force["alpha"],
        epoch=trainer.current_epoch,
        global_step=trainer.global_step,
        best=None if score is None else {"monitor": monitored.monitor, "score": float(score)},
        adapted=adaptations(hp.num_classes),
    )
    metrics = card.robustness.metrics
    card.robustness.not_learned = not_learned(
        metrics.get(val_tag("clean", hp.get("norm", "linf")).removeprefix("val/")),
        hp.num_classes,
        metrics.get("top_class"),
    )
    return card


def _json_native(value: object) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_json_native(v) for v in value)
    return isinstance(value, (int, float, str, bool, type(None)))


def _record(obj: object, values: dict) -> dict:
    """``{"class": <its import path>, **values}``, keeping the JSON-native values only (tuples as lists)."""
    kept = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if _json_native(v)}
    return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", **kept}


def schedule_record(sched: object) -> dict:
    """A learning-rate schedule for the card: its class and each argument of its ``__init__`` that it keeps under
    the same name (``total_steps``, ``peak_at``, ``milestones``, ``gamma``, torch's ``step_size``...)."""
    names = [
        n for n in inspect.signature(type(sched).__init__).parameters if n not in ("self", "optimizer", "last_epoch")
    ]
    return _record(sched, {n: getattr(sched, n) for n in names if hasattr(sched, n)})


def optimization_record(trainer: L.Trainer) -> dict:
    """The optimizer and schedule in force, for the card: ``{"optimizer": {"class", <its defaults>},
    "lr_scheduler": schedule_record(...) or None}`` (JSON-native values only)."""
    if not trainer.optimizers:
        return {"optimizer": None, "lr_scheduler": None}
    opt = trainer.optimizers[0]
    configs = trainer.lr_scheduler_configs
    return {
        "optimizer": _record(opt, opt.defaults),
        "lr_scheduler": schedule_record(configs[0].scheduler) if configs else None,
    }


def split_rng_by_rank(rank: int, world_size: int) -> None:
    """Give each of ``world_size`` processes its own torch RNG stream (for random starts, noise and targets).

    ``seed_everything`` seeds every rank alike (so the initial weights agree), which would give every rank the same
    random starts for its different images. Each rank draws one number from the shared stream and reseeds with it
    plus its rank: distinct, and reproducible from the shared state (also after a resume). One process: untouched.
    """
    if world_size > 1:
        base = int(torch.randint(2**62, (1,)))
        torch.manual_seed(base + rank)
