"""Train a robust classifier: ``python train.py fit --config configs/digits.yaml [--model.adv_ratio 0.5 ...]``."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    RichModelSummary,
    RichProgressBar,
    TQDMProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

import robust.data.modules  # noqa: F401  (its data modules known by their short names: --data.help ImageFolder)
from robust.cli import parser_error, user_error
from robust.cli_defaults import check_accelerator
from robust.data.roots import resolve_data_root
from robust.errors import RobustError
from robust.threats import val_tag
from robust.training.averaging import WeightEMA
from robust.training.callbacks import AdversarialImages, ValidateAtEnd
from robust.training.checkpointing import BestCheckpoint
from robust.training.guard import CatastrophicOverfittingGuard
from robust.training.module import ARG_SECTIONS, AdversarialClassifier
from robust.training.precision import resolve_precision
from robust.training.progress import OneLineSummary, RunNotices, progress_bar, quiet_known_noise, resume_command
from robust.training.resume import RunLengthSchedule, check_resume_config, run_folder
from robust.training.runfiles import run_summary

FIT_HELP = """Train a robust classifier. The options most runs change (every other one is listed below):

  --config configs/X.yaml           the recipe (digits.yaml: the default; imagefolder.yaml: your own images)
  --data NAME                       the data: Digits, MNIST, CIFAR10, ImageFolder (--data.help ImageFolder: its
                                    options: batch_size, num_workers, image_size, augment, limit)
  --data.init_args.root DIR         an image-folder root holding train/ and test/ (or set ROBUST_DATA)
  --data.init_args.batch_size N     images per optimizer step (a few hundred images: 16, for enough steps)
  --trainer.max_epochs N            how long to train
  --model.attack / --model.eps      the training attack (fgsm_rs, nfgsm, pgd, fgsm, none) and its L-inf budget
  --model.adv_ratio R               fraction of each batch made adversarial (0: clean training)
  --ema.decay D                     validate and keep an average of the weights (e.g. 0.999)
  --trainer.accelerator / devices   gpu, cpu; how many
  --ckpt_path last                  resume the latest run of this config (--accept_config_changes true: with
                                    other settings than it was trained with)
  --print_config                    print the resolved config and exit"""


# --model.<argument> -> the title of its section (--model.optimizer.help: the optimizer's)
MODEL_SECTION = {f"model.{name}": title for title, names in ARG_SECTIONS.items() for name in names}


class RobustHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, keeping the line breaks of the description and epilog (:data:`FIT_HELP`) and
    listing the model's options under the titles of their sections (:data:`robust.training.module.ARG_SECTIONS`). The
    sections are in the help only: the keys stay flat (``--model.eps``, ``model: eps:``)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))

    def add_arguments(self, actions) -> None:
        section = None
        for action in actions:
            title = MODEL_SECTION.get(action.dest.removesuffix(".help"))
            if title is not None and title != section:
                if section is not None:
                    self.end_section()
                self.start_section(title)
                section = title
            self.add_argument(action)
        if section is not None:
            self.end_section()


class RobustArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line (:func:`robust.cli.parser_error`: the closest valid option,
    the valid choices) and exit code 2; the full usage stays behind ``--help``. ``debug``: jsonargparse's own."""

    debug = False

    def error(self, message: str, ex: Exception | None = None):
        if self.debug or not self.exit_on_error:  # nested parsers raise, for the top one to report
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [s for action in parser._actions for s in action.option_strings]
        line = parser_error(message, parser.prog.replace(" [options]", ""), options)
        print(f"error: {line}", file=sys.stderr)
        self.exit(2)


class RobustCLI(LightningCLI):
    """LightningCLI with the data's classes linked into the model, robust checkpointing, resume, weight averaging
    (``--ema.decay``) and a precision that follows the hardware."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.channels", apply_on="instantiate")
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
        # last.ckpt from its own checkpoint callback, written at every train-epoch end: the monitored one writes
        # last.ckpt only when it also writes a best checkpoint, so it would lag behind when validation is rare.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/pgd_worst",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-epoch{epoch:03d}-pgd_worst{val/pgd_worst:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "last_checkpoint.filename": ModelCheckpoint.CHECKPOINT_NAME_LAST,
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.every_n_epochs": 1,
                "last_checkpoint.save_on_train_epoch_end": True,
                "last_checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(AdversarialImages, "image_grid")
        parser.add_lightning_class_args(CatastrophicOverfittingGuard, "overfit_guard")
        # After image_grid: callbacks run in this order, and the grid must be drawn before the average is swapped out.
        parser.add_lightning_class_args(WeightEMA, "ema")
        parser.add_argument(
            "--accept_config_changes",
            type=bool,
            default=False,
            help="with --ckpt_path: resume a run although settings other than its length (max_epochs, max_steps) "
            "differ from those it was trained with (default: refused, naming them)",
        )

    def __init__(self, *args, **kwargs) -> None:
        # train.py's own arguments, for the command that resumes an interrupted run (RunNotices)
        given = kwargs.get("args")
        self.command_args = list(sys.argv[1:] if given is None else given)
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        """Lightning's subcommands, or only the one the command names: each gets a parser built from every class
        signature (about 0.1 s apiece), and a run uses one. Without one named (``train.py --help``, a typo) all."""
        every = LightningCLI.subcommands()
        named = next((a for a in self.command_args if a in every), None)
        return {named: every[named]} if named else every

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks = [ours_for_lightnings(cb) for cb in trainer.callbacks]
        trainer.callbacks.append(RunNotices(resume_command(self.command_args)))
        # --ema.decay null or 0 (the default): no averaging, so no callback at all
        trainer.callbacks = [cb for cb in trainer.callbacks if not (isinstance(cb, WeightEMA) and cb.decay is None)]
        # Before the checkpoint callbacks, which Lightning runs last anyway.
        trainer.callbacks[:0] = [RunLengthSchedule(), ValidateAtEnd()]
        return trainer

    def before_instantiate_classes(self) -> None:
        """Resolve the precision for this machine and the data folder (``$ROBUST_DATA``); on a resume, log into the
        resumed run's version folder (for ``--ckpt_path last``, the latest one, so Lightning finds its last.ckpt) and
        check that only the run length differs from the settings it was trained with."""
        config = self.config.get(self.subcommand, self.config)
        trainer = config["trainer"]
        check_accelerator(trainer.get("accelerator"), trainer.get("devices"))
        trainer["precision"], notice = resolve_precision(trainer.get("precision"), trainer.get("accelerator"))
        if notice:
            print(notice)
        data = config.get("data")
        init = getattr(data, "init_args", None)
        if init is not None and "root" in init:
            init["root"], notice = resolve_data_root(init["root"], downloads=bool(init.get("download")))
            if notice:
                print(notice)
        monitor_the_norm(config)
        if self.subcommand != "fit" or config.get("ckpt_path") is None:
            return
        quiet_known_noise(resuming=True)
        logger = trainer.get("logger")
        log_init = getattr(logger, "init_args", None) or {}
        folder = run_folder(
            Path(log_init.get("save_dir", "lightning_logs")) / (log_init.get("name") or ""), config["ckpt_path"]
        )
        if folder is None:
            return
        if config["ckpt_path"] == "last":
            log_init["version"] = int(folder.name.split("_")[1])
        given = yaml.safe_load(self._parser(self.subcommand).dump(config, skip_validation=True))
        notice = check_resume_config(folder, given, bool(config.get("accept_config_changes")))
        if notice:
            print(notice)

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        log_dir = trainer.logger.log_dir if trainer.logger else None  # not trainer.log_dir: it is a collective call
        print("\n" + "\n".join(run_summary(trainer, log_dir)))


def ours_for_lightnings(callback):
    """Lightning's default bar and summary replaced (a user's own kept): lines where stdout is no terminal, else the
    rich bar with named fields (:func:`robust.training.progress.progress_bar`); a one-line summary."""
    if type(callback) in (RichProgressBar, TQDMProgressBar):
        return progress_bar()
    if type(callback) in (ModelSummary, RichModelSummary):
        return OneLineSummary()
    return callback


def monitor_the_norm(config) -> None:
    """Keep the best checkpoint by the worst case of the run's own threat model: under ``--model.norm l2`` the
    default monitor ``val/pgd_worst`` (L∞) becomes ``val/l2/pgd_worst``, and its file name says so."""
    norm, checkpoint = config["model"].get("norm", "linf"), config.get("checkpoint")
    if norm == "linf" or checkpoint is None or checkpoint.get("monitor") != "val/pgd_worst":
        return
    tag = val_tag("pgd_worst", norm)
    checkpoint["monitor"] = tag
    checkpoint["filename"] = f"best-epoch{{epoch:03d}}-{norm}_pgd_worst{{{tag}:.4f}}"


def main(args: list[str] | None = None, run: bool = True) -> RobustCLI | None:
    """Parse ``args`` (default ``sys.argv``) and run the subcommand; with ``run=False`` (no subcommand in ``args``)
    only build the model, data and trainer, for scripts that add callbacks before fitting."""
    debug = RobustArgumentParser.debug = "--debug" in (args if args is not None else sys.argv)
    if debug:
        args = [a for a in (args if args is not None else sys.argv[1:]) if a != "--debug"]
    quiet_known_noise()
    try:
        return RobustCLI(
            AdversarialClassifier,
            parser_class=RobustArgumentParser,
            subclass_mode_data=True,
            trainer_defaults={
                "inference_mode": False,
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "lightning_logs"},
                },
                "callbacks": [LearningRateMonitor(logging_interval="epoch")],
                "plugins": [{"class_path": "robust.training.checkpointing.AtomicCheckpointIO"}],
            },
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "formatter_class": RobustHelpFormatter,
                "description": __doc__,
                "fit": {"description": FIT_HELP, "epilog": FIT_HELP},
            },
            args=args,
            run=run,
        )
    except SIGTERMException:  # Lightning's, a SystemExit without a code: a terminated run must not exit 0
        raise SystemExit(128 + signal.SIGTERM) from None
    except MisconfigurationException as exc:  # Lightning's word for a user's setting it refuses: one line too
        if debug:
            raise
        raise SystemExit(user_error(RobustError(str(exc).strip().splitlines()[0]))) from None
    except Exception as exc:
        raise SystemExit(user_error(exc, debug)) from None


if __name__ == "__main__":
    main()
