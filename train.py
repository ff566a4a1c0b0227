"""Train a robust classifier: ``python train.py fit --config configs/digits.yaml [--model.adv_ratio 0.5 ...]``."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from robust.averaging import WeightEMA
from robust.callbacks import AdversarialImages
from robust.errors import RobustError
from robust.guard import CatastrophicOverfittingGuard
from robust.module import AdversarialClassifier
from robust.precision import resolve_precision


class RobustCLI(LightningCLI):
    """LightningCLI with the data's classes linked into the model, robust checkpointing, resume, weight averaging
    (``--ema.decay``) and a precision that follows the hardware."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.channels", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # last.ckpt from its own checkpoint callback, written at every train-epoch end: the monitored one writes
        # last.ckpt only when it also writes a best checkpoint, so it would lag behind when validation is rare.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/pgd_worst", "checkpoint.mode": "max",
            "checkpoint.filename": "best-epoch{epoch:03d}-pgd_worst{val/pgd_worst:.4f}",
            "checkpoint.auto_insert_metric_name": False,
            "last_checkpoint.filename": ModelCheckpoint.CHECKPOINT_NAME_LAST, "last_checkpoint.monitor": None,
            "last_checkpoint.save_top_k": 1, "last_checkpoint.every_n_epochs": 1,
            "last_checkpoint.save_on_train_epoch_end": True, "last_checkpoint.enable_version_counter": False,
        })  # fmt: skip
        parser.add_lightning_class_args(AdversarialImages, "image_grid")
        parser.add_lightning_class_args(CatastrophicOverfittingGuard, "overfit_guard")
        # After image_grid: callbacks run in this order, and the grid must be drawn before the average is swapped out.
        parser.add_lightning_class_args(WeightEMA, "ema")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # --ema.decay null or 0 (the default): no averaging, so no callback at all
        trainer.callbacks = [cb for cb in trainer.callbacks if not (isinstance(cb, WeightEMA) and cb.decay is None)]
        return trainer

    def before_instantiate_classes(self) -> None:
        """Resolve the precision for this machine; with ``--ckpt_path last``, log into the latest run's version
        folder so Lightning finds its last.ckpt."""
        config = self.config.get(self.subcommand, self.config)
        trainer = config["trainer"]
        trainer["precision"], notice = resolve_precision(trainer.get("precision"), trainer.get("accelerator"))
        if notice:
            print(notice)
        if config.get("ckpt_path") != "last":
            return
        logger = config["trainer"].get("logger")
        init = getattr(logger, "init_args", None) or {}
        root = Path(init.get("save_dir", "lightning_logs")) / (init.get("name") or "")
        runs = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: int(p.parts[-3].split("_")[1]))
        if not runs:
            raise RobustError(f"--ckpt_path last: no last.ckpt under {root}/version_*/checkpoints to resume from")
        init["version"] = int(runs[-1].parts[-3].split("_")[1])

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        last = next((cb for cb in trainer.checkpoint_callbacks if cb is not ckpt), ckpt)
        log_dir = trainer.logger.log_dir if trainer.logger else None  # not trainer.log_dir: it is a collective call
        print(f"\nTensorBoard logs: {log_dir}   (view: tensorboard --logdir {log_dir})")
        if ckpt is not None and ckpt.best_model_path:
            print(f"Best checkpoint ({ckpt.monitor} = {float(ckpt.best_model_score):.4f}): {ckpt.best_model_path}")
            print(f"Last checkpoint: {last.best_model_path}")


def main(args: list[str] | None = None, run: bool = True) -> RobustCLI | None:
    """Parse ``args`` (default ``sys.argv``) and run the subcommand; with ``run=False`` (no subcommand in ``args``)
    only build the model, data and trainer, for scripts that add callbacks before fitting."""
    debug = "--debug" in (args if args is not None else sys.argv)
    if debug:
        args = [a for a in (args if args is not None else sys.argv[1:]) if a != "--debug"]
    try:
        return RobustCLI(
            AdversarialClassifier,
            subclass_mode_data=True,
            trainer_defaults={
                "inference_mode": False,
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "lightning_logs"},
                },
                "callbacks": [LearningRateMonitor(logging_interval="epoch")],
                "plugins": [{"class_path": "robust.checkpointing.AtomicCheckpointIO"}],
            },  # fmt: skip
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except (RobustError, ValueError) as exc:
        error = robust_cause(exc)
        if debug or error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def robust_cause(exc: BaseException | None) -> RobustError | None:
    """``exc`` or the RobustError it was raised from (``raise ... from``): jsonargparse re-raises an error from a
    class it instantiates (a data module's ``__init__`` rejecting its arguments) as its own ValueError."""
    while exc is not None and not isinstance(exc, RobustError):
        exc = exc.__cause__
    return exc


if __name__ == "__main__":
    main()
