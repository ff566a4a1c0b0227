"""Weight averaging: an exponential moving average (EMA) of the trained weights, by Lightning's own callback."""

from __future__ import annotations

import math

import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.swa_utils import get_ema_multi_avg_fn

from robust.errors import RobustError

EMA_DECAY_KEY = "ema_decay"  # the checkpoint key through which the decay reaches the model card
FIRST_STEP_SHARE = 0.05  # the most of the first step's weights an average may keep at the end of a run


class WeightEMA(WeightAveraging):
    """EMA of the module's weights and buffers after every optimizer step: ``avg = decay·avg + (1 - decay)·w``
    (:func:`torch.optim.swa_utils.get_ema_multi_avg_fn`; the first update copies ``w``).

    Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` does the rest, as designed: the average is
    swapped in for each validation epoch (so ``val/*``, the checkpoint choice, the image grid and the model card's
    metrics are the average's); every checkpoint's ``state_dict`` is the average (so ``last.ckpt``, the best
    checkpoint and their exports are), with the trained weights under ``current_model_state`` and the update count
    under ``averaging_state``, so a resume continues both; when training ends the module holds the average.

    BatchNorm running statistics are averaged with the weights (``use_buffers``): the trained model's own statistics
    belong to its own weights, not to the average, and recomputing them (``update_bn``) would cost a pass over the
    data and a choice between clean and adversarial inputs. Integer buffers (``num_batches_tracked``) get a
    truncated average; BatchNorm with a momentum does not read them.

    The catastrophic-overfitting guard keeps :meth:`average_state` with the weights it may roll back to and restores
    it with them, so no collapsed weights stay in the average.

    A decay too slow for the run (after its optimizer steps the average would still hold more than
    :data:`FIRST_STEP_SHARE` of the first step's weights: 0.99 over 16 steps keeps 86%) is lowered to
    ``1 - 3/steps`` for the run, with one line saying so (``adapt``); the card records the decay in force.

    Args:
        decay: weight of the old average at each step, in [0, 1); the last ~``1/(1 - decay)`` steps dominate
            (0.999: ~1,000 steps). ``None`` or 0: no averaging; train.py then adds no callback.
        adapt: lower a decay too slow for the run's optimizer steps to ``1 - 3/steps`` (false: keep it as given,
            and say what to change).
    """

    def __init__(self, decay: float | None = None, adapt: bool = True) -> None:
        if decay is not None and not 0 <= decay < 1:
            raise RobustError(f"ema decay must be in [0, 1) (null or 0: no averaging), got {decay}")
        self.decay = float(decay) if decay else None
        self.adapt = adapt
        super().__init__(use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(self.decay or 0.0))

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or self.decay is None or self.decay ** (total - 1) <= FIRST_STEP_SHARE:
            return
        held = f"{self.decay ** (total - 1):.0%}"
        fitting = max(0.0, round(1 - 3 / total, 4))  # 1 - 3/steps: the first step weighs e^-3 = 5% at the end
        if not self.adapt:
            rank_zero_info(
                f"ema: decay {self.decay} over this run's {int(total)} optimizer steps leaves {held} of the first "
                f"step's weights in the average; --ema.decay {fitting:g} or less averages over the run"
            )
            return
        rank_zero_info(
            f"ema: decay {self.decay} -> {fitting:g} for this run: over its {int(total)} optimizer steps {self.decay} "
            f"would leave {held} of the first step's weights in the average (--ema.adapt false keeps it)"
        )
        self.decay = fitting
        if self._average_model is not None:
            self._average_model.multi_avg_fn = get_ema_multi_avg_fn(fitting)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None:  # the state_dict is the average
            checkpoint[EMA_DECAY_KEY] = self.decay

    def average_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the average (weights, buffers and update count) for :meth:`load_average_state`."""
        if self._average_model is None:
            raise RobustError("the weight average exists only while fitting")
        return {k: v.detach().to("cpu", copy=True) for k, v in self._average_model.state_dict().items()}

    def load_average_state(self, state: dict[str, torch.Tensor]) -> None:
        """Make the average what :meth:`average_state` returned."""
        if self._average_model is None:
            raise RobustError("the weight average exists only while fitting")
        self._average_model.load_state_dict(state)


def weight_averages(trainer) -> list[WeightEMA]:
    """The trainer's weight-averaging callbacks (none without ``--ema.decay``)."""
    return [cb for cb in trainer.callbacks if isinstance(cb, WeightEMA)]
