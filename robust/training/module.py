"""AdversarialClassifier: adversarial training in Lightning, and robust validation metrics.

Training (per batch ``x`` ``N×3×H×W`` in [0, 1], ``y`` ``N``): the first ``round(adv_ratio·N)`` examples of the
(shuffled) batch are replaced by adversarial examples from the training attack in force (the configured one unless
the overfitting guard switched it, :meth:`AdversarialClassifier.set_attack`), made with input gradients only, with
BatchNorm in ``attack_bn_mode``; then one cross-entropy step on the mixed batch, true labels.

Validation runs the threat suite of :mod:`robust.threats` in the module's threat model and logs accuracies in [0, 1]
under ``val/<key>`` for L∞ and ``val/l2/<key>`` for L2 (:func:`val_tag`; keys in :data:`VAL_KEYS`), computed with
torchmetrics so they are synced across DDP processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from robust.attacks import ATTACKS, check_budget, default_step, least_likely_class, random_other_class
from robust.errors import RobustError
from robust.fast_path import fast_model
from robust.models.build import head_of
from robust.models.card import CARD_KEY, default_normalization
from robust.models.resolve import create_model, describe_init
from robust.objectives import check_objective, objective_loss, training_attack
from robust.threats import DEFAULT_THREATS, ThreatSpec, bn_mode, labels_for, predictions, val_tag
from robust.training.optim import OptimizerFactory, SchedulerFactory, default_optimizer, default_scheduler
from robust.training.run_record import RunRecord

VAL_KEYS = DEFAULT_THREATS  # validation runs every threat but AutoAttack's


@dataclass(frozen=True)
class AttackInForce:
    """The training attack in force and its step (pixel units); replaced only by
    :meth:`AdversarialClassifier.set_attack` and :meth:`AdversarialClassifier.set_attack_step`."""

    attack: str
    alpha: float


TrainAttack = Literal[("none", *ATTACKS)]  # robust.objectives.TRAIN_ATTACKS: the attack registry's, or none

# AdversarialClassifier's arguments by section, in signature order; train.py's help lists them under these titles.
ARG_SECTIONS: dict[str, tuple[str, ...]] = {
    "network": (
        "arch",
        "num_classes",
        "class_names",
        "channels",
        "weights",
        "mean",
        "std",
        "cifar_stem",
        "channels_last",
    ),
    "adversarial training": (
        "attack",
        "target",
        "norm",
        "eps",
        "alpha",
        "attack_steps",
        "attack_early_exit",
        "nfgsm_noise",
        "clamp_start",
        "objective",
        "beta",
        "adv_ratio",
        "attack_bn_mode",
    ),
    "optimization": ("optimizer", "lr_scheduler", "backbone_lr_scale"),
    "validation": ("val_eps", "val_steps", "val_alpha", "jpeg_quality", "val_seed"),
}


class AdversarialClassifier(L.LightningModule):
    """Classifier trained on a mix of clean and adversarial examples.

    The arguments come in the sections of :data:`ARG_SECTIONS`, in this order in the signature, below and in
    ``train.py fit --help`` (which lists them under those titles): the network, adversarial training, optimization,
    validation. Their keys stay flat (``--model.eps``, ``model: eps:`` in a config), as in checkpoints.

    Args:
        arch: the network: a name of :data:`robust.models.archs.ARCHS` (``resnet18``, ``mnist_net``,
            ``preact_resnet18``, ...) or ``hf:<model id>``.
        num_classes: outputs of the classifier; linked from the data.
        class_names: names for the ``num_classes`` outputs (image grids, exports); linked from the data.
        channels: input channels, 1 (grayscale) or 3 (RGB); linked from the data.
        weights: initial weights for fine-tuning: ``imagenet``, a state dict file of ``arch`` (``.pth``), one of our
            ``.ckpt`` files or an export folder; a new head when its class count differs (logged in one line;
            recorded in the card's ``training.init``). Default: random initialization.
        mean: per-channel mean of the normalization inside the model, [0, 1] pixel units (default: ImageNet's for
            RGB, 0 for grayscale); images stay in [0, 1] outside it.
        std: per-channel standard deviation of that normalization (default: ImageNet's for RGB, 1 for grayscale).
        cifar_stem: a 3×3 stride-1 first convolution and no max-pool, for small (32×32 and under) images
            (torchvision ResNets).
        channels_last: keep activations in channels-last memory format (faster on GPUs with AMP).
        attack: training attack: ``none``, ``fgsm``, ``fgsm_rs`` (random start, Wong et al. 2020), ``nfgsm``
            (noise ``nfgsm_noise``·eps, no projection, de Jorge et al. 2022), ``pgd``; the one in force is
            :attr:`attack` (changed only by :meth:`set_attack`).
        target: ``none`` (untargeted), ``random`` or ``least_likely`` target class; labels stay true.
        norm: the threat model: ``linf`` or ``l2`` (training attack, validation, the card, TensorBoard tags).
        eps: budget in pixel units: L∞ in [0, 1], L2 in [0, sqrt(C·H·W)].
        alpha: step (default :meth:`default_alpha`: 1.25·eps for fgsm_rs, eps for fgsm and nfgsm,
            eps/4 for pgd; trades/mart: 0.007/0.031·eps); changed only by :meth:`set_attack_step`.
        attack_steps: PGD training steps (default 7; 10 for trades/mart, as their official scripts).
        attack_early_exit: PGD training leaves each example at its first misclassified iterate (Wong et al.'s MNIST
            PGD; Madry et al. run every step).
        nfgsm_noise: N-FGSM's noise, uniform in ±``nfgsm_noise``·eps.
        clamp_start: clip ``fgsm_rs``'s random start to [0, 1] before its gradient (false: Wong et al.'s MNIST code).
        objective: training loss: ``ce`` (cross-entropy on the clean/adversarial mix), ``trades`` (Zhang et al.
            2019) or ``mart`` (Wang et al. 2020), each with its own adversarial examples (:mod:`robust.objectives`).
        beta: TRADES / MART trade-off weight (default: the official script's, 6 and 5).
        adv_ratio: fraction of each batch replaced by adversarial examples, in [0, 1]; 0 = clean training.
        attack_bn_mode: BatchNorm mode while making training attacks (``eval`` uses running stats).
        optimizer: ``params -> Optimizer``: a ``torch.optim`` class path with its ``init_args`` (default
            :func:`robust.training.optim.default_optimizer`: SGD lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4).
        lr_scheduler: ``(optimizer, total_steps) -> LRScheduler``, stepped every optimizer step: a schedule of
            :mod:`robust.training.optim` (default ``OneCycle`` peaking at the optimizer's lr; ``Cyclic``, Wong et al.'s;
            ``Cosine``) or null for a constant lr.
        backbone_lr_scale: the learning rate of every parameter but the head's (:func:`robust.models.build.head_of`)
            is the optimizer's ``lr × backbone_lr_scale`` (for fine-tuning; 1 = one group).
        val_eps: budget of the validation threats, in the card's ``robustness.eps`` (default: ``eps``).
        val_steps: validation PGD steps (default 10).
        val_alpha: validation PGD step (default :attr:`robust.threats.ThreatSpec.step`: eps/4 in L∞, 2.5·eps/steps
            in L2).
        jpeg_quality: JPEG defense quality, 1..100.
        val_seed: seed of validation random starts and targets.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        class_names: list[str] | None = None,
        channels: int = 3,
        weights: str | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        cifar_stem: bool = False,
        channels_last: bool = False,
        attack: TrainAttack = "fgsm_rs",
        target: Literal["none", "random", "least_likely"] = "none",
        norm: Literal["linf", "l2"] = "linf",
        eps: float = 8 / 255,
        alpha: float | None = None,
        attack_steps: int | None = None,
        attack_early_exit: bool = False,
        nfgsm_noise: float = 2.0,
        clamp_start: bool = True,
        objective: Literal["ce", "trades", "mart"] = "ce",
        beta: float | None = None,
        adv_ratio: float = 1.0,
        attack_bn_mode: Literal["eval", "train"] = "eval",
        optimizer: OptimizerFactory = default_optimizer,
        lr_scheduler: SchedulerFactory | None = default_scheduler,
        backbone_lr_scale: float = 1.0,
        val_eps: float | None = None,
        val_steps: int = 10,
        val_alpha: float | None = None,
        jpeg_quality: int = 75,
        val_seed: int = 1234,
    ) -> None:
        super().__init__()
        if not 0.0 <= adv_ratio <= 1.0:
            raise RobustError(f"adv_ratio must be in [0, 1], got {adv_ratio}")
        if class_names is not None and len(class_names) != num_classes:
            raise RobustError(f"{len(class_names)} class names given for {num_classes} classes")
        obj = check_objective(objective, attack, target != "none")
        if objective != "ce" and adv_ratio != 1.0:
            raise RobustError(
                f"objective {objective!r} trains on the whole batch (clean and adversarial terms): "
                f"adv_ratio must be 1, got {adv_ratio}"
            )
        if nfgsm_noise < 0:
            raise RobustError(f"nfgsm_noise must be 0 or more (times eps), got {nfgsm_noise}")
        if not backbone_lr_scale >= 0:
            raise RobustError(f"backbone_lr_scale must be 0 or more (times lr), got {backbone_lr_scale}")
        # (new names: save_hyperparameters below reads the arguments' names in this frame, as given)
        steps = attack_steps if attack_steps is not None else obj.steps or 7
        step = alpha if alpha is not None else self.default_alpha(attack, objective, eps, norm, steps)
        check_budget(eps, step if attack != "none" else None, steps, norm=norm)
        self._in_force = AttackInForce(attack, float(step))
        self.val_spec = ThreatSpec(
            eps if val_eps is None else val_eps,
            val_alpha,
            val_steps,
            quality=jpeg_quality,
            seed=val_seed,
            threats=VAL_KEYS,
            norm=norm,
        )
        # The optimizer and schedule are callables (not checkpoint material); LightningCLI's config.yaml records them.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        default_mean, default_std = default_normalization(channels)
        self.hparams.mean, self.hparams.std = tuple(mean or default_mean), tuple(std or default_std)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.model = create_model(
            arch,
            num_classes=num_classes,
            weights=weights,
            mean=self.hparams.mean,
            std=self.hparams.std,
            cifar_stem=cifar_stem,
            channels=channels,
        )
        if weights is not None:
            rank_zero_info(describe_init(self.weights_init, num_classes))
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_acc = nn.ModuleDict({k: MulticlassAccuracy(num_classes, average="micro") for k in ("clean", "adv")})
        self.val_acc = nn.ModuleDict({k: MulticlassAccuracy(num_classes, average="micro") for k in VAL_KEYS})

    def forward(self, x: Tensor) -> Tensor:
        """``N×C×H×W`` images in [0, 1] -> ``N×num_classes`` logits."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    # ---- training ------------------------------------------------------------------------------

    @staticmethod
    def default_alpha(attack: str, objective: str, eps: float, norm: str = "linf", steps: int = 7) -> float:
        """The training step when none is given: the objective's official one, else the attack's training step in
        the registry (:func:`robust.attacks.default_step`); ``eps`` for ``none`` (no step is taken)."""
        official = check_objective(objective, attack).official_alpha(eps)
        if official or attack == "none":
            return official or eps
        return default_step(attack, eps, norm=norm, steps=steps, training=True)

    @property
    def attack(self) -> str:
        """The training attack in force: the configured one unless the overfitting guard switched it
        (:meth:`set_attack`)."""
        return self._in_force.attack

    @property
    def alpha(self) -> float:
        """The training attack's step in force, pixel units (:meth:`set_attack_step`)."""
        return self._in_force.alpha

    @property
    def attack_steps(self) -> int:
        """PGD training steps: ``attack_steps``, else the objective's official count, else 7."""
        hp = self.hparams
        return hp.attack_steps if hp.attack_steps is not None else check_objective(hp.objective, hp.attack).steps or 7

    @property
    def beta(self) -> float | None:
        """The TRADES / MART trade-off weight: ``beta``, else the official script's."""
        hp = self.hparams
        return hp.beta if hp.beta is not None else check_objective(hp.objective, hp.attack).beta

    @property
    def weights_init(self) -> dict:
        """Where the initial weights came from (:func:`robust.models.resolve.init_record`), as the card keeps it."""
        return self.model.card.training.init

    def set_attack_step(self, alpha: float) -> None:
        """Change the training attack's step (pixel units) to ``alpha``: the one place it changes, kept in
        checkpoints."""
        check_budget(self.hparams.eps, alpha, norm=self.hparams.norm)
        self._in_force = dataclasses.replace(self._in_force, alpha=float(alpha))

    def set_attack(self, attack: str) -> None:
        """Train with ``attack`` from now on, at its default step (:meth:`default_alpha`): the one place the
        attack in force changes (the overfitting guard's ``switch_to_nfgsm``); kept in checkpoints, as the step."""
        hp = self.hparams
        check_objective(hp.objective, attack, hp.target != "none")
        alpha = self.default_alpha(attack, hp.objective, hp.eps, hp.norm, self.attack_steps)
        check_budget(hp.eps, alpha, norm=hp.norm)
        self._in_force = AttackInForce(attack, float(alpha))

    def in_force(self) -> dict:
        """What the card records besides the hyper-parameters: the training attack and step in force (``alpha``
        None when nothing is attacked), the attack it was switched from (or None), the steps, beta and the initial
        weights' record."""
        configured = self.hparams.attack
        return {
            "attack": self.attack,
            "switched_from": None if self.attack == configured else configured,
            "alpha": None if self.attack == "none" else self.alpha,
            "attack_steps": self.attack_steps,
            "beta": self.beta,
            "init": self.weights_init,
        }

    def resume_in_force(self, training: dict) -> None:
        """Take back from a checkpoint card's ``training`` record what the run had changed: the guard's attack
        switch (``switch_to_nfgsm``) when resuming the same configured attack (another configured attack wins), the
        step in force after any rollback, and the record of where the initial weights came from (not what the
        weights path holds now)."""
        if training.get("switched_from") == self.hparams.attack:
            self.set_attack(training["attack"])
        if training.get("alpha") is not None and training.get("attack") == self.attack:
            self.set_attack_step(training["alpha"])
        if training.get("init") is not None:
            self.model.card.training.init = training["init"]

    def make_training_attack(self, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial versions of ``x`` (true labels ``y``) by the configured training attack."""
        hp = self.hparams
        targeted = hp.target != "none"
        with bn_mode(self.model, hp.attack_bn_mode):
            if hp.target == "random":
                y = random_other_class(y, hp.num_classes)
            elif hp.target == "least_likely":
                y = least_likely_class(self, x)
            return training_attack(
                self,
                x,
                y,
                hp.objective,
                self.attack,
                eps=hp.eps,
                alpha=self.alpha,
                steps=self.attack_steps,
                noise=hp.nfgsm_noise,
                targeted=targeted,
                clamp_start=hp.clamp_start,
                norm=hp.norm,
                early_exit=hp.attack_early_exit,
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.hparams.objective != "ce":
            return self.paired_objective_step(x, y)
        n_adv = round(self.hparams.adv_ratio * len(x)) if self.attack != "none" else 0
        if n_adv:
            x = torch.cat([self.make_training_attack(x[:n_adv], y[:n_adv]), x[n_adv:]])
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        preds = logits.detach().argmax(1)
        if n_adv:
            self.train_acc["adv"](preds[:n_adv], y[:n_adv])
            self.log("train/adv", self.train_acc["adv"], on_step=False, on_epoch=True, prog_bar=True)
        if n_adv < len(x):
            self.train_acc["clean"](preds[n_adv:], y[n_adv:])
            self.log("train/clean", self.train_acc["clean"], on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def paired_objective_step(self, x: Tensor, y: Tensor) -> Tensor:
        """TRADES / MART: adversarial examples for the whole batch, then the objective's loss on the clean and the
        adversarial logits (two forward passes, as the official code)."""
        x_adv = self.make_training_attack(x, y)
        logits_clean, logits_adv = self(x), self(x_adv)
        loss = objective_loss(self.hparams.objective, logits_adv, y, logits_clean=logits_clean, beta=self.beta)
        self.log("train/loss", loss, prog_bar=True)
        for key, logits in (("clean", logits_clean), ("adv", logits_adv)):
            self.train_acc[key](logits.detach().argmax(1), y)
            self.log(f"train/{key}", self.train_acc[key], on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_before_backward(self, loss: Tensor) -> None:
        """Stop at the first non-finite training loss, on every process at once, with one clear line: a diverged
        run would otherwise train on NaN weights to the end and checkpoint them."""
        if self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False):
            raise RobustError(
                f"the training loss is {loss.item()} at step {self.global_step} (epoch "
                f"{self.current_epoch}): training diverged; lower the learning rate "
                "(--model.optimizer.lr)"
            )

    # ---- validation ----------------------------------------------------------------------------

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        with torch.no_grad():
            self.log("val/loss", F.cross_entropy(self(x), y), sync_dist=True)
        # The same threats every epoch (seeded by the batch index); the training RNG is untouched.
        preds = predictions(self._frozen_copy(), x, y, self.val_spec.for_batch(batch_idx))
        self._clean_counts += torch.bincount(preds["clean"], minlength=self.hparams.num_classes)
        for key in VAL_KEYS:
            self.val_acc[key](preds[key], labels_for(key, preds, y))
            self.log(
                val_tag(key, self.hparams.norm),
                self.val_acc[key],
                on_step=False,
                on_epoch=True,
                prog_bar=key in ("clean", "pgd_worst"),
            )

    def _frozen_copy(self) -> nn.Module:
        """This validation's frozen, folded copy of the network (:func:`robust.fast_path.fast_model`) that the threat
        suite attacks: the same figures within float rounding, about 1.2× faster (docs/benchmarks.md). Built at the
        epoch's first batch, after every epoch-start hook (a weight average swapped in) has run; kept in a tuple so
        it is no submodule (not in a checkpoint, not seen by DDP)."""
        if not self._val_copy:
            self._val_copy = (fast_model(self.model),)
        return self._val_copy[0]

    def on_validation_epoch_start(self) -> None:
        self._clean_counts = torch.zeros(self.hparams.num_classes, dtype=torch.long, device=self.device)
        self._val_copy: tuple[nn.Module, ...] = ()

    def on_validation_epoch_end(self) -> None:
        """Log ``val/top_class``: the share of clean predictions given to the most predicted class (1 for a constant
        classifier; :func:`robust.learned.not_learned` reads it)."""
        self._val_copy = ()
        counts = self.trainer.strategy.reduce(self._clean_counts.float(), reduce_op="sum")
        self.log("val/top_class", counts.max() / counts.sum().clamp(min=1))

    # ---- optimization and checkpoints ---------------------------------------------------------

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: one, or with ``backbone_lr_scale`` != 1 the ``backbone`` (every
        parameter but the head's) and the ``head``; the backbone's lr is scaled in :meth:`configure_optimizers`."""
        if self.hparams.backbone_lr_scale == 1:  # one group: older checkpoints' optimizer state fits
            return [{"params": list(self.parameters())}]
        head = {id(p) for p in head_of(self.model).parameters()}
        return [
            {"name": "backbone", "params": [p for p in self.parameters() if id(p) not in head]},
            {"name": "head", "params": [p for p in self.parameters() if id(p) in head]},
        ]

    def configure_optimizers(self):
        opt = self.optimizer(self.param_groups())
        for group in opt.param_groups:
            if group.get("name") == "backbone":
                group["lr"] *= self.hparams.backbone_lr_scale
        if self.lr_scheduler is None:
            return opt
        sched = self.lr_scheduler(opt, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self) -> list:
        """The run record (:class:`robust.training.run_record.RunRecord`: the card and RNG states in every
        checkpoint, each process's RNG stream): the module brings it to any Trainer."""
        return [RunRecord()]

    def on_fit_start(self) -> None:
        """Say once, in the log and in TensorBoard's text tab (``val/threats``), how validation's threats adapt to
        a class count under AutoAttack's needs (2 or 3 classes; the card keeps it too)."""
        adapted = self.val_spec.adaptations(self.hparams.num_classes)
        if not adapted:
            return
        text = f"validation on {self.hparams.num_classes} classes: " + "; ".join(a["note"] for a in adapted.values())
        rank_zero_info(text)
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_text"):
            experiment.add_text("val/threats", text)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Take back the training attack and step in force and the initial weights' record (:meth:`resume_in_force`)
        from the checkpoint's card, also for ``AdversarialClassifier.load_from_checkpoint``."""
        self.resume_in_force((checkpoint.get(CARD_KEY) or {}).get("training", {}))
