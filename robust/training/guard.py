"""The catastrophic-overfitting guard: a policy callback over the threat suite's probe measurement."""

from __future__ import annotations

import copy
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from robust.attacks import SINGLE_STEP_ATTACKS, seeded_rng
from robust.errors import RobustError
from robust.fast_path import fast_model
from robust.threats import ThreatSpec, accuracy
from robust.training.averaging import weight_averages


class CatastrophicOverfittingGuard(L.Callback):
    """Watch single-step adversarial training for catastrophic overfitting (Wong et al. 2020) and act on it.

    When training starts it takes a fixed probe of ``n`` training examples (evenly spaced over the training set, so
    every class of a class-sorted folder is in it; drawn once, under a fixed seed). It checks once when
    training starts (``check_at_start``: a baseline, also right after a resume), then at the last training
    batch of every epoch (before validation, so ``val/*`` and checkpoints see any rollback), or every
    ``every_n_steps`` optimizer steps instead. A check (:meth:`measure`) runs the threat suite's ``pgd``
    (PGD-``pgd_steps``, default step, random start) and ``fgsm`` on the probe at the module's training ``eps``
    (:func:`robust.threats.accuracy`: eval mode, seeded, training randomness untouched), and logs ``guard/pgd``,
    ``guard/fgsm``, ``guard/collapsed`` (0 or 1), ``guard/alpha`` and ``guard/rollbacks``.

    A check calls a collapse (:meth:`verdict`) by any of three signatures, each with FGSM accuracy held within
    ``fgsm_tolerance`` of its value at the best check, or risen (a general blow-up, where FGSM accuracy falls too, is
    not catastrophic overfitting):

    - ``fell``: PGD accuracy more than ``min_drop`` below the best seen *and* below ``drop_ratio`` × best (Wong et
      al. 2020's early stop: a sharp fall of the probe's PGD accuracy).
    - ``masked``: once the model was robust (best PGD accuracy at least ``robust_floor``), PGD's share of FGSM's
      accuracy (PGD / FGSM on the probe) fell more than ``ratio_drop`` below its value at the best. A collapsed
      model's masked gradients fool a weak probe (its PGD accuracy can stay far above a strong attack's), but not
      the FGSM-vs-PGD picture: FGSM accuracy climbs towards clean while PGD's falls (Kim et al. 2021).
    - ``never robust``: from ``grace`` of the run on (the fraction of its optimizer steps), PGD accuracy has never
      reached ``robust_floor`` while FGSM accuracy is at least ``min_gap`` above it: training overfits to its own
      single-step attack from the start (plain FGSM at a large eps), so there is no best to fall from.

    On collapse ``action`` is:

    - ``stop`` (default): restore the weights kept (in memory) at the most robust check so far (the best
      probe PGD accuracy; a later check that ties it replaces it) and stop (``trainer.should_stop``), so the
      final model and ``last.ckpt`` are the pre-collapse model whatever the validation frequency.
    - ``rollback``: restore those weights and the optimizer state kept with them, change the training attack as
      ``on_collapse`` says, and go on (the LR schedule goes on too); after ``max_rollbacks`` rollbacks, or with no
      weights kept, stop instead. ``on_collapse``:

      - ``shrink_step`` (default): multiply the attack step by ``alpha_factor`` (``pl_module.set_attack_step``).
        Meant for ``fgsm_rs``, where a smaller step is the known cure (Wong et al. 2020); for plain ``fgsm`` a
        smaller step trains for a smaller eps.
      - ``switch_to_nfgsm``: train with N-FGSM from then on (``pl_module.set_attack("nfgsm")``: noise
        ``nfgsm_noise``·eps, default 2, no projection, its default step: eps with the ``ce`` objective; de Jorge
        et al. 2022), which keeps the full step and held where FGSM-RS collapsed in the paper (eps 16/255). A
        later collapse, under N-FGSM, shrinks its step as ``shrink_step`` does.
    - ``warn``: only warn and log.

    The most robust weights, not the last healthy ones: a collapse is measured against the best, and the slide
    towards it can take several checks that are each still "healthy" but already far less robust.

    With weight averaging (:class:`robust.training.averaging.WeightEMA`) the checks measure the trained weights (they
    collapse first; the average follows them), and a restore puts back the average kept with those weights too,
    so neither ``stop`` nor ``rollback`` leaves collapsed weights in it.

    Active when the configured attack (``pl_module.hparams.attack``) is a single-step one (``fgsm``, ``fgsm_rs``,
    ``nfgsm``; the checks run in the module's norm), or any with ``force``. The scalar state (best accuracies,
    rollbacks) is saved in checkpoints and restored on resume (the module keeps the attack and step in force, in its
    card); the kept weights are not (after a resume, the first healthy check keeps the weights then in force).
    Thresholds and their reasoning: ``docs/overfitting-guard.md``.

    Args:
        action: what a collapse does: ``stop`` (restore the most robust weights and stop), ``rollback`` (restore
            them and go on as ``on_collapse`` says) or ``warn`` (only log).
        on_collapse: with ``action: rollback``: ``shrink_step`` (multiply the attack step by ``alpha_factor``) or
            ``switch_to_nfgsm`` (train with N-FGSM from then on).
        n: training images in the fixed probe each check measures.
        every_n_steps: check every this many optimizer steps instead of once per epoch (null: per epoch).
        pgd_steps: PGD steps of each check's attack.
        min_drop: a collapse needs probe PGD accuracy more than this far (in [0, 1]) below the best seen...
        drop_ratio: ...and below this fraction of the best.
        fgsm_tolerance: every signature needs FGSM accuracy within this of its value at the best (or risen).
        ratio_drop: ``masked``: PGD / FGSM accuracy this far below its value at the best check...
        robust_floor: ...once the best PGD accuracy reached this; ``never robust``: PGD accuracy never reached it...
        min_gap: ...while FGSM accuracy is this far above PGD's...
        grace: ...at a check past this fraction of the run's optimizer steps, in [0, 1].
        alpha_factor: ``shrink_step``'s factor on the attack step, in (0, 1).
        max_rollbacks: rollbacks allowed before a collapse stops the run instead.
        batch_size: batch size of the probe's attacks.
        seed: seed of the probe's choice and of its attacks' random starts.
        check_at_start: also check when training starts (a baseline; also right after a resume).
        force: watch any training attack, not only ``fgsm`` and ``fgsm_rs``.
    """

    # The single-step attacks of the registry: those that can collapse (N-FGSM less often, but it can).
    WATCHED = SINGLE_STEP_ATTACKS
    ON_COLLAPSE = ("shrink_step", "switch_to_nfgsm")

    def __init__(
        self,
        action: Literal["rollback", "stop", "warn"] = "stop",
        on_collapse: Literal["shrink_step", "switch_to_nfgsm"] = "shrink_step",
        n: int = 128,
        every_n_steps: int | None = None,
        pgd_steps: int = 10,
        min_drop: float = 0.2,
        drop_ratio: float = 0.5,
        fgsm_tolerance: float = 0.05,
        ratio_drop: float = 0.18,
        robust_floor: float = 0.1,
        min_gap: float = 0.3,
        grace: float = 0.4,
        alpha_factor: float = 0.5,
        max_rollbacks: int = 3,
        batch_size: int = 256,
        seed: int = 0,
        check_at_start: bool = True,
        force: bool = False,
    ) -> None:
        if action not in ("rollback", "stop", "warn"):
            raise RobustError(f"overfit guard action must be rollback, stop or warn, got {action!r}")
        if on_collapse not in self.ON_COLLAPSE:
            raise RobustError(f"overfit guard on_collapse must be {' or '.join(self.ON_COLLAPSE)}, got {on_collapse!r}")
        if on_collapse != "shrink_step" and action != "rollback":
            raise RobustError(
                f"overfit guard on_collapse {on_collapse} acts on a rollback: set action rollback (it is {action})"
            )
        if n < 1 or batch_size < 1 or pgd_steps < 1 or (every_n_steps is not None and every_n_steps < 1):
            raise RobustError("overfit guard n, batch_size, pgd_steps and every_n_steps must be at least 1")
        if not (0 < min_drop <= 1 and 0 < drop_ratio <= 1 and 0 < alpha_factor < 1 and max_rollbacks >= 0):
            raise RobustError(
                "overfit guard needs 0 < min_drop <= 1, 0 < drop_ratio <= 1, 0 < alpha_factor < 1 "
                "and max_rollbacks >= 0"
            )
        if not all(0 <= v <= 1 for v in (fgsm_tolerance, ratio_drop, robust_floor, min_gap, grace)):
            raise RobustError(
                "overfit guard fgsm_tolerance, ratio_drop, robust_floor, min_gap and grace must be in [0, 1]"
            )
        self.action, self.on_collapse, self.n, self.every_n_steps = action, on_collapse, n, every_n_steps
        self.pgd_steps = pgd_steps
        self.min_drop, self.drop_ratio, self.fgsm_tolerance = min_drop, drop_ratio, fgsm_tolerance
        self.ratio_drop, self.robust_floor, self.min_gap, self.grace = ratio_drop, robust_floor, min_gap, grace
        self.alpha_factor, self.max_rollbacks, self.batch_size = alpha_factor, max_rollbacks, batch_size
        self.seed, self.check_at_start, self.force = seed, check_at_start, force
        self.best_pgd = -1.0
        self.fgsm_at_best = 0.0
        self.rollbacks = 0
        self.collapses: list[dict] = []  # {epoch, step, signature, pgd, fgsm, action} of every collapse called
        self.history: list[dict[str, float]] = []
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self._best: dict | None = None  # weights + optimizer state at best_pgd (not checkpointed)
        self._last_step = -1

    # ---- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "best_pgd": self.best_pgd,
            "fgsm_at_best": self.fgsm_at_best,
            "rollbacks": self.rollbacks,
            "collapses": list(self.collapses),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_pgd = float(state_dict.get("best_pgd", -1.0))
        self.fgsm_at_best = float(state_dict.get("fgsm_at_best", 0.0))
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.collapses = list(state_dict.get("collapses", []))

    def card_record(self) -> dict:
        """What the model card keeps of the guard (``training.guard``): its action, probe and thresholds, the best
        probe PGD accuracy and every collapse it called, with what it did."""
        thresholds = ("min_drop", "drop_ratio", "fgsm_tolerance", "ratio_drop", "robust_floor", "min_gap", "grace")
        return {
            "action": self.action,
            "probe": {"n": self.n, "pgd_steps": self.pgd_steps, "seed": self.seed},
            "thresholds": {name: getattr(self, name) for name in thresholds},
            "best_pgd": None if self.best_pgd < 0 else self.best_pgd,
            "collapses": list(self.collapses),
            "rollbacks": self.rollbacks,
        }

    # ---- hooks -----------------------------------------------------------------------------------

    def active(self, pl_module) -> bool:
        """Whether the guard watches this module (a single-step training attack, or ``force``)."""
        return self.force or getattr(pl_module.hparams, "attack", None) in self.WATCHED

    def on_train_start(self, trainer, pl_module) -> None:
        # After any checkpoint restore and once the data is set up.
        if not self.active(pl_module):
            return
        self._probe = self.take_probe(trainer, self.n, self.seed)
        if self.check_at_start:  # a baseline, and weights to roll back to
            self.check(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Epoch checks run on the last batch, before validation, so val/* and checkpoints see any rollback.
        step = trainer.global_step
        due = step % self.every_n_steps == 0 if self.every_n_steps else trainer.is_last_batch
        if due and step != self._last_step:
            self._last_step = step
            self.check(trainer, pl_module)

    # ---- the check -------------------------------------------------------------------------------

    @staticmethod
    def take_probe(trainer, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` evenly spaced training examples as (``n×3×H×W`` in [0, 1], ``n`` labels), drawn under ``seed``."""
        datamodule = getattr(trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_set", None)
        if dataset is None:
            dataset = trainer.train_dataloader.dataset
        n = min(n, len(dataset))
        with seeded_rng(seed):  # augmenting transforms draw from torch's (CPU) RNG
            items = [dataset[i] for i in torch.linspace(0, len(dataset) - 1, n).round().long().unique().tolist()]
        return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])

    def measure(self, pl_module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(PGD accuracy, FGSM accuracy) of ``pl_module`` on ``x``, ``y`` at its training eps; eval mode, seeded."""
        spec = ThreatSpec(
            float(pl_module.hparams.eps),
            steps=self.pgd_steps,
            seed=self.seed,
            threats=("pgd", "fgsm"),
            norm=getattr(pl_module.hparams, "norm", "linf"),
        )
        acc = accuracy(fast_model(pl_module.model), x, y, spec, self.batch_size)
        return acc["pgd"], acc["fgsm"]

    @staticmethod
    def ratio(pgd_acc: float, fgsm_acc: float) -> float:
        """PGD's share of FGSM's accuracy, in [0, 1] (1 when FGSM fools everything: nothing left to mask)."""
        return min(pgd_acc / fgsm_acc, 1.0) if fgsm_acc > 0 else 1.0

    def verdict(self, pgd_acc: float, fgsm_acc: float, progress: float = 1.0) -> str | None:
        """The collapse signature this check shows (``fell``, ``masked`` or ``never robust``), or None when healthy;
        ``progress`` is the fraction of the run's optimizer steps done, in [0, 1]."""
        if fgsm_acc < self.fgsm_at_best - self.fgsm_tolerance:
            return None  # FGSM fell too: a general blow-up, not catastrophic overfitting
        best, ratio_at_best = self.best_pgd, self.ratio(self.best_pgd, self.fgsm_at_best)
        if best >= 0 and pgd_acc < best - self.min_drop and pgd_acc < self.drop_ratio * best:
            return "fell"
        if best >= self.robust_floor and self.ratio(pgd_acc, fgsm_acc) < ratio_at_best - self.ratio_drop:
            return "masked"
        if progress >= self.grace and max(best, pgd_acc) < self.robust_floor and fgsm_acc - pgd_acc >= self.min_gap:
            return "never robust"
        return None

    def collapsed(self, pgd_acc: float, fgsm_acc: float, progress: float = 1.0) -> bool:
        """Whether this check shows a collapse signature (:meth:`verdict`)."""
        return self.verdict(pgd_acc, fgsm_acc, progress) is not None

    def record(self, pgd_acc: float, fgsm_acc: float) -> bool:
        """A healthy check: whether it is the most robust so far (then it becomes the best)."""
        best = pgd_acc >= self.best_pgd
        if best:
            self.best_pgd, self.fgsm_at_best = pgd_acc, fgsm_acc
        return best

    def replay(self, checks: list[tuple[float, float, float]]) -> int | None:
        """The index of the first of ``checks`` (PGD accuracy, FGSM accuracy, progress) called a collapse, judging
        them as a run would; None when none is. For recorded trajectories; the guard's state moves as in a run."""
        for i, (pgd_acc, fgsm_acc, progress) in enumerate(checks):
            if self.collapsed(pgd_acc, fgsm_acc, progress):
                return i
            self.record(pgd_acc, fgsm_acc)
        return None

    @staticmethod
    def progress(trainer) -> float:
        """The fraction of the run's optimizer steps done, in [0, 1] (1 when the run has no planned end)."""
        total = trainer.estimated_stepping_batches
        return min(trainer.global_step / total, 1.0) if 0 < total < float("inf") else 1.0

    def check(self, trainer, pl_module) -> bool:
        """Measure, act or keep the weights, log; returns whether a collapse was detected."""
        if self._probe is None:
            return False
        pgd_acc, fgsm_acc = self.measure(pl_module, *self._probe)
        progress = self.progress(trainer)
        signature = self.verdict(pgd_acc, fgsm_acc, progress)
        if signature:
            self._act(trainer, pl_module, pgd_acc, fgsm_acc, signature)
        else:
            self._keep(trainer, pl_module, pgd_acc, fgsm_acc)
        measured = {"guard/pgd": pgd_acc, "guard/fgsm": fgsm_acc, "guard/collapsed": signature is not None}
        self._log(trainer, pl_module, measured | {"guard/pgd_over_fgsm": self.ratio(pgd_acc, fgsm_acc)}, progress)
        return signature is not None

    def _keep(self, trainer, pl_module, pgd_acc: float, fgsm_acc: float) -> None:
        """A healthy check: remember it if it is the most robust so far, with its weights and optimizer state."""
        best = self.record(pgd_acc, fgsm_acc)
        if self.action != "warn" and (best or self._best is None):  # None: just resumed, nothing kept yet
            self._best = {
                "model": {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()},
                "optimizers": [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers],
                "averages": [ema.average_state() for ema in weight_averages(trainer)],
            }

    def _restore(self, trainer, pl_module) -> None:
        pl_module.load_state_dict(self._best["model"])
        for opt, state in zip(trainer.optimizers, self._best["optimizers"], strict=True):
            opt.load_state_dict(copy.deepcopy(state))
        for ema, state in zip(weight_averages(trainer), self._best["averages"], strict=True):
            ema.load_average_state(state)

    def _log(self, trainer, pl_module, measured: dict[str, float], progress: float) -> None:
        metrics = {k: float(v) for k, v in measured.items()}
        metrics.update({"guard/alpha": float(pl_module.alpha), "guard/rollbacks": float(self.rollbacks)})
        where = {"step": float(trainer.global_step), "epoch": float(trainer.current_epoch), "progress": progress}
        self.history.append(where | metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def _act(self, trainer, pl_module, pgd_acc: float, fgsm_acc: float, signature: str) -> None:
        """A collapse: warn, and restore the kept weights and stop, or roll back with a smaller attack step or
        N-FGSM."""
        what = (
            f"catastrophic overfitting ({signature}) at epoch {trainer.current_epoch}, step {trainer.global_step}: "
            f"PGD accuracy {pgd_acc:.3f} (best {max(self.best_pgd, 0):.3f}), FGSM accuracy {fgsm_acc:.3f} on "
            f"{len(self._probe[1])} training examples"
        )
        if signature == "never robust":
            what += (
                f" (the model never resisted PGD while it learned to resist its own {pl_module.attack}: use "
                "--model.attack fgsm_rs or nfgsm, or a smaller --model.eps)"
            )
        action = self.action
        where = {"epoch": trainer.current_epoch, "step": trainer.global_step, "signature": signature}
        self.collapses.append(where | {"pgd": pgd_acc, "fgsm": fgsm_acc, "action": action})
        if action == "rollback" and (self._best is None or self.rollbacks >= self.max_rollbacks):
            reason = "no weights kept yet" if self._best is None else f"{self.rollbacks} rollbacks done"
            what += f"; cannot roll back ({reason})"
            action = self.collapses[-1]["action"] = "stop"
        if action != "warn" and self._best is not None:
            self._restore(trainer, pl_module)
            what += f"; restored the most robust weights (probe PGD accuracy {self.best_pgd:.3f})"
        if action == "rollback" and self.on_collapse == "switch_to_nfgsm" and pl_module.attack in ("fgsm", "fgsm_rs"):
            pl_module.set_attack("nfgsm")
            self.rollbacks += 1
            what += (
                f", training attack now nfgsm (noise {pl_module.hparams.nfgsm_noise:g}·eps, step "
                f"{pl_module.alpha:.5f}, no projection)"
            )
        elif action == "rollback":
            eps = float(pl_module.hparams.eps)
            # Steps past eps (fgsm) or 2·eps (fgsm_rs) are clipped away by the projection: shrink what is effective.
            # N-FGSM does not project: all of its step is effective.
            limit = {"fgsm": eps, "nfgsm": float("inf")}.get(pl_module.attack, 2 * eps)
            pl_module.set_attack_step(min(float(pl_module.alpha), limit) * self.alpha_factor)
            self.rollbacks += 1
            what += f", attack step now {pl_module.alpha:.5f}"
        elif action == "stop":
            trainer.should_stop = True
            what += "; stopping"
        rank_zero_warn(what)
