"""The run record a checkpoint of :class:`robust.module.AdversarialClassifier` keeps besides weights and optimizer
state, and what a resume takes back from it.

A checkpoint holds, under these keys:

- :data:`robust.loading.CARD_KEY`: the :class:`robust.card.ModelCard` (``ModelCard.to_dict()``) built by
  :func:`robust.loading.training_card` from the module's hyper-parameters with what is in force when saving: the
  attack and step (the overfitting guard may have changed them), the steps, beta, the EMA decay, the initial
  weights' record, the global seed, the optimizer and schedule (:func:`optimization_record`), the data's
  description, the latest ``val/*`` figures and the monitored best score;
- ``rng_torch`` (and ``rng_cuda`` where CUDA is available): the RNG states, so a resumed run draws the same
  shuffles and random starts (bit-identical after a SIGKILL).

:func:`save` writes them (the module's ``on_save_checkpoint``), :func:`restore` takes them back (its
``on_load_checkpoint``): the guard's attack switch and step, when resuming the same recipe, the record of the
initial weights, and the RNG states. :func:`split_rng_by_rank` gives each DDP process its own stream when training
starts.
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING

import lightning as L
import torch

from robust.averaging import EMA_DECAY_KEY
from robust.card import ModelCard
from robust.guard import CatastrophicOverfittingGuard
from robust.learned import not_learned
from robust.loading import CARD_KEY, training_card

if TYPE_CHECKING:
    from robust.module import AdversarialClassifier

RNG_TORCH, RNG_CUDA = "rng_torch", "rng_cuda"  # the checkpoint keys of the RNG states


def save(module: AdversarialClassifier, checkpoint: dict) -> None:
    """Put the card of ``module``'s run so far and the RNG states in ``checkpoint``."""
    checkpoint[CARD_KEY] = run_card(module, checkpoint).to_dict()
    checkpoint[RNG_TORCH] = torch.get_rng_state()
    if torch.cuda.is_available():
        checkpoint[RNG_CUDA] = torch.cuda.get_rng_state_all()


def watching(callback, module: AdversarialClassifier) -> bool:
    """Whether ``callback`` is an overfitting guard that watches ``module``'s training."""
    return isinstance(callback, CatastrophicOverfittingGuard) and callback.active(module)


def run_card(module: AdversarialClassifier, checkpoint: dict) -> ModelCard:
    """The card of ``module`` as its trainer stands: the settings in force (defaults resolved, guard changes kept;
    the EMA decay is the one :class:`robust.averaging.WeightEMA` put in ``checkpoint``, its hook running first), the
    data module's description, the latest ``val/*`` figures and the monitored checkpoint callback's best score."""
    trainer = module.trainer
    datamodule = getattr(trainer, "datamodule", None)
    monitored = next((cb for cb in trainer.checkpoint_callbacks if cb.monitor), None)
    score = None if monitored is None else monitored.best_model_score
    if hasattr(monitored, "real_score"):  # robust.checkpointing.BestCheckpoint: the measured value
        score = monitored.real_score()
    hp = module.hparams
    in_force = {
        **hp,
        "attack": module.attack,
        "switched_from": None if module.attack == hp.attack else hp.attack,
        "attack_steps": module.attack_steps,
        "beta": module.beta,
        "ema_decay": checkpoint.get(EMA_DECAY_KEY),
        "init": module.weights_init,
        "seed": None if os.environ.get("PL_GLOBAL_SEED") is None else int(os.environ["PL_GLOBAL_SEED"]),
        "guard": next((cb.card_record() for cb in trainer.callbacks if watching(cb, module)), None),
        **optimization_record(trainer),
    }
    card = training_card(
        in_force,
        datamodule.describe() if hasattr(datamodule, "describe") else None,
        trainer.callback_metrics,
        alpha=None if module.attack == "none" else module.alpha,
        epoch=trainer.current_epoch,
        global_step=trainer.global_step,
        best=None if score is None else {"monitor": monitored.monitor, "score": float(score)},
    )
    from robust.module import val_tag  # robust.module imports this module

    metrics = card.robustness.metrics
    card.robustness.not_learned = not_learned(
        metrics.get(val_tag("clean", hp.get("norm", "linf")).removeprefix("val/")),
        hp.num_classes,
        metrics.get("top_class"),
    )
    return card


def restore(module: AdversarialClassifier, checkpoint: dict) -> None:
    """Take back from ``checkpoint`` what the run had changed: the guard's attack switch (``switch_to_nfgsm``) when
    resuming the same configured attack (another configured attack wins), the step in force after any rollback, the
    record of where the initial weights came from (not what the weights path holds now), and the RNG states."""
    training = (checkpoint.get(CARD_KEY) or {}).get("training", {})
    if training.get("switched_from") == module.hparams.attack:
        module.set_attack(training["attack"])
    if training.get("alpha") is not None and training.get("attack") == module.attack:
        module.set_attack_step(training["alpha"])
    if training.get("init") is not None:
        module.weights_init = training["init"]
    if RNG_TORCH in checkpoint:
        torch.set_rng_state(checkpoint[RNG_TORCH])
    if RNG_CUDA in checkpoint and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint[RNG_CUDA])


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
