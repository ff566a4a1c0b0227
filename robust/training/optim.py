"""Optimizers and learning-rate schedules for :class:`robust.training.module.AdversarialClassifier`, as LightningCLI
callables.

The module takes ``optimizer`` (``params -> Optimizer``, any ``torch.optim`` class path with its ``init_args``) and
``lr_scheduler`` (``(optimizer, total_steps) -> LRScheduler``, stepped once per optimizer step). ``total_steps`` is
the run's length (Lightning's ``estimated_stepping_batches``), so a schedule is written as fractions of the run and
fits any ``max_epochs``. The schedules here each take ``(optimizer, total_steps)``:

- :class:`OneCycle`: torch's one-cycle, linear, peaking at each parameter group's ``lr`` (the project default).
- :class:`Cyclic`: Wong et al. 2020's cyclic schedule: linear from 0 to the peak ``lr`` at ``peak_at`` of the run,
  back to 0 at its end (``locuslab/fast_adversarial`` ``MNIST/train_mnist.py``'s ``lr_schedule``).
- :class:`Cosine`: cosine annealing to 0 over the run.
- :class:`Piecewise`: the lr times ``gamma`` at each milestone (fractions of the run): Madry et al.'s and Rice et
  al. 2020's step decay (0.1 -> 0.01 -> 0.001 at 1/2 and 3/4 of 200 epochs).

``lr_scheduler: null`` keeps the optimizer's ``lr`` throughout (Madry et al.'s flat schedule). The defaults are
:data:`DEFAULT_OPTIMIZER` and :data:`DEFAULT_SCHEDULER`, in LightningCLI's ``class_path`` form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
from lightning.pytorch.cli import instantiate_class
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

OptimizerFactory = Callable[[Iterable], Optimizer]
SchedulerFactory = Callable[[Optimizer, int], LRScheduler]

DEFAULT_OPTIMIZER = {
    "class_path": "torch.optim.SGD",
    "init_args": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
}
DEFAULT_SCHEDULER = {"class_path": "robust.training.optim.OneCycle", "init_args": {"peak_at": 0.4}}


class OneCycle(OneCycleLR):
    """torch's ``OneCycleLR`` with a linear ramp: each parameter group peaks at its own ``lr`` at ``peak_at`` of the
    run (up from ``lr / 25``, down to ``lr / 25e4``; SGD momentum cycled 0.95 -> 0.85 -> 0.95, torch's defaults)."""

    def __init__(self, optimizer: Optimizer, total_steps: int, peak_at: float = 0.4) -> None:
        self.peak_at = float(peak_at)  # kept for the card
        super().__init__(
            optimizer,
            # a group torch's one-cycle already ran on (a resume's rebuild) keeps its peak in max_lr, not in lr
            max_lr=[g.get("max_lr", g["lr"]) for g in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=peak_at,
            anneal_strategy="linear",
        )


class RunFraction(LambdaLR):
    """A schedule written as a multiple of each group's ``lr`` per optimizer step, :meth:`factor`, from the step and
    the run's length ``total_steps`` alone, so a resume of another length rebuilds it for the new length
    (:func:`robust.training.resume.rebuild_schedule`). Subclasses set their own attributes, then call this
    ``__init__``."""

    name = "run-fraction"

    def __init__(self, optimizer: Optimizer, total_steps: int) -> None:
        self.total_steps = int(total_steps)
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """The multiple of each group's initial lr for optimizer step ``step`` (0-based)."""
        raise NotImplementedError


class Cyclic(RunFraction):
    """Wong et al. 2020's cyclic schedule: ``lr × interp(t, [0, peak_at, 1], [0, 1, 0])`` where ``t`` is the
    fraction of the run done after this step (their ``np.interp([epoch + (i + 1) / len(loader)], [0, epochs·2//5,
    epochs], [0, lr_max, 0])``). No momentum cycling (their optimizer is Adam with its defaults)."""

    name = "cyclic"

    def __init__(self, optimizer: Optimizer, total_steps: int, peak_at: float = 0.4) -> None:
        self.peak_at = float(peak_at)
        super().__init__(optimizer, total_steps)

    def factor(self, step: int) -> float:
        return float(np.interp((step + 1) / self.total_steps, [0.0, self.peak_at, 1.0], [0.0, 1.0, 0.0]))


class Piecewise(RunFraction):
    """Step decay: ``lr × gamma^k`` after the ``k``-th of ``milestones`` (fractions of the run, ascending)."""

    name = "piecewise"

    def __init__(
        self, optimizer: Optimizer, total_steps: int, milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1
    ) -> None:
        self.milestones, self.gamma = tuple(milestones), float(gamma)
        super().__init__(optimizer, total_steps)

    def factor(self, step: int) -> float:
        return self.gamma ** sum(step >= m * self.total_steps for m in self.milestones)


class Cosine(RunFraction):
    """Cosine annealing from each group's ``lr`` to 0 over the run: ``lr × (1 + cos(π·step / total_steps)) / 2``
    (torch's ``CosineAnnealingLR`` with ``eta_min`` 0, in closed form)."""

    name = "cosine"

    def factor(self, step: int) -> float:
        return (1 + math.cos(math.pi * step / self.total_steps)) / 2


def default_optimizer(params: Iterable) -> Optimizer:
    """:data:`DEFAULT_OPTIMIZER` on ``params``."""
    return instantiate_class((params,), DEFAULT_OPTIMIZER)


def default_scheduler(optimizer: Optimizer, total_steps: int) -> LRScheduler:
    """:data:`DEFAULT_SCHEDULER` for ``optimizer`` over ``total_steps``."""
    return instantiate_class((optimizer, total_steps), DEFAULT_SCHEDULER)
