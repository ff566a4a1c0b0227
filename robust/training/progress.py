"""What a training run prints while it runs: progress any log can hold, one line on an interrupt, no known noise.

- :func:`progress_bar`: Lightning's rich bar on a terminal (:class:`NamedRichBar`, its fields named), else
  :class:`LineProgress`: plain lines at a steady pace, which a file, ``nohup``, CI, SLURM or a notebook keeps
  (the rich bar draws nothing there until the run ends).
- :class:`RunNotices`: the device line at the start, a line when the data is too small for the settings; on
  Ctrl-C or SIGTERM, one line naming what was saved and the command that resumes it (``--ckpt_path last``,
  :mod:`robust.training.resume`).
- :func:`quiet_known_noise`: Lightning's and torch's known-harmless messages, each filtered by its exact text.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
import sys
import time
import warnings

import torch
from lightning.pytorch.callbacks import Callback, ModelSummary, ProgressBar, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from robust.learned import small_data_advice

# The bar's fields by the names a reader knows (train/adv: accuracy on the training attack's own examples).
FIELD_NAMES = {
    "train/loss": "loss",
    "train/adv": "train-attack acc",
    "train/clean": "train clean acc",
    "val/clean": "val clean",
    "val/pgd_worst": "val pgd_worst",
    "val/l2/pgd_worst": "val L2 pgd_worst",
}


def named_fields(metrics: dict) -> dict:
    """The bar's ``metrics`` without the logger's version number (``v_num``), under :data:`FIELD_NAMES`."""
    return {FIELD_NAMES.get(k, k): v for k, v in metrics.items() if k != "v_num"}


def _scalar(value) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class NamedRichBar(RichProgressBar):
    """Lightning's rich bar, its fields named (:func:`named_fields`)."""

    def get_metrics(self, trainer, pl_module) -> dict:
        return named_fields(super().get_metrics(trainer, pl_module))


class LineProgress(ProgressBar):
    """Progress as plain lines, for output that is not a terminal.

    A training line at every epoch's end, and within an epoch every ``every_n_steps`` optimizer steps or
    ``every_seconds``, whichever comes first: epoch, step/total, loss, the training attack's accuracy, learning
    rate, images per second and the time left (training at its pace so far, and the validations still due at
    theirs). One line per validation: clean accuracy and every worst case (``val/*worst``), with the time it took.

    Args:
        every_n_steps: a line after this many steps within an epoch (None: by time only).
        every_seconds: a line after this much time within an epoch.
    """

    def __init__(self, every_n_steps: int | None = 50, every_seconds: float = 30.0) -> None:
        super().__init__()
        self.every_n_steps, self.every_seconds = every_n_steps, every_seconds
        self._enabled = True
        self._start = self._last = 0.0
        self._steps_at_start = self._steps_at_line = 0
        self._images = 0
        self._val_seconds, self._validations = 0.0, 0
        self._val_start: float | None = None
        self._lr: float | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args, **kwargs) -> None:
        if self._enabled:
            print(*args, **kwargs, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.monotonic()
        self._steps_at_start = self._steps_at_line = trainer.global_step
        self._images, self._val_seconds, self._validations = 0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The rate this step uses: after a run's last step a schedule has moved on to one no step uses.
        if trainer.optimizers:
            self._lr = max(g["lr"] for g in trainer.optimizers[0].param_groups)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[-1])
        since = trainer.global_step - self._steps_at_line
        due = self.every_n_steps is not None and since >= self.every_n_steps
        last = batch_idx + 1 >= trainer.num_training_batches  # the epoch's own line comes next
        if (due or time.monotonic() - self._last >= self.every_seconds) and since > 0 and not last:
            self._train_line(trainer, in_epoch=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._train_line(trainer, in_epoch=False)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer, pl_module) -> None:
        took = time.monotonic() - (self._val_start or time.monotonic())
        self._val_start = None
        if trainer.sanity_checking:
            return
        self._val_seconds += took
        self._validations += 1
        metrics = trainer.callback_metrics
        keys = [k for k in metrics if k.startswith("val/") and (k.endswith("/clean") or k.endswith("worst"))]
        figures = "  ".join(f"{k.removeprefix('val/')} {_scalar(metrics[k]):.3f}" for k in keys)
        self.print(f"validation after epoch {trainer.current_epoch}: {figures}  ({duration(took)})")

    def _train_line(self, trainer, in_epoch: bool) -> None:
        now = time.monotonic()
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        done = step - self._steps_at_start
        training = max(now - self._start - self._val_seconds, 1e-9)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None  # -1: by max_steps
        parts = [f"epoch {trainer.current_epoch}" + (f"/{epochs - 1}" if epochs else "")]
        parts.append(f"step {step}/{int(total)}" if math.isfinite(total) else f"step {step}")
        metrics = trainer.progress_bar_metrics
        if "train/loss" in metrics:
            parts.append(f"loss {_scalar(metrics['train/loss']):.4f}")
        if not in_epoch:  # the epoch's accuracies exist only at its end
            parts += [
                f"{FIELD_NAMES[k]} {_scalar(metrics[k]):.3f}" for k in ("train/adv", "train/clean") if k in metrics
            ]
        if self._lr is not None:
            parts.append(f"lr {self._lr:.3g}")
        parts.append(f"{self._images / training:.1f} img/s")
        if done > 0 and math.isfinite(total):
            left = training / done * max(total - step, 0)
            if self._validations:  # at the pace of those so far: on small data validation is most of a run
                left += self._val_seconds / self._validations * validations_left(trainer, in_epoch)
            parts.append(f"ETA {duration(left)}")
        self.print("  ".join(p for p in parts if p))
        self._last, self._steps_at_line = now, step


def validations_left(trainer, in_epoch: bool) -> int:
    """The validations a run still has at epoch ends (each ``check_val_every_n_epoch`` and the last epoch's,
    :class:`robust.training.callbacks.ValidateAtEnd`), the current epoch's included while it runs (``in_epoch``)."""
    every, last = trainer.check_val_every_n_epoch, trainer.max_epochs
    if not every or not last or last < 1 or trainer.limit_val_batches == 0:
        return 0
    first = trainer.current_epoch if in_epoch else trainer.current_epoch + 1
    return sum(1 for e in range(first, last) if (e + 1) % every == 0 or e == last - 1)


def progress_bar(stream=None) -> ProgressBar:
    """The bar for ``stream`` (default ``sys.stdout``): :class:`NamedRichBar` on a terminal, else
    :class:`LineProgress`."""
    stream = sys.stdout if stream is None else stream
    return NamedRichBar() if getattr(stream, "isatty", lambda: False)() else LineProgress()


class OneLineSummary(ModelSummary):
    """The model summary as one line (parameters and size); Lightning's table lists the module's metric
    containers, and its FLOPs column is 0 without a sample input."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, **kwargs):
        frozen = total_parameters - trainable_parameters
        print(
            f"model: {parameter_count(trainable_parameters)} trainable parameters"
            + (f", {parameter_count(frozen)} frozen" if frozen else "")
            + f" ({model_size:.1f} MB)"
        )


def parameter_count(n: int) -> str:
    """``n`` as Lightning's summary writes it (``11.2 M``, ``1.2 K``, ``330``), without the padding it leaves on
    counts under 1,000."""
    return get_human_readable_count(n).strip()


def resume_command(args: list[str]) -> str:
    """The command that resumes a run started with ``args`` (train.py's arguments): the same, with
    ``--ckpt_path last``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return "python train.py " + shlex.join([*kept, "--ckpt_path", "last"])


class RunNotices(Callback):
    """The device line when fitting starts; on an interrupt (Ctrl-C, SIGTERM), one line: the latest checkpoint
    written (``last.ckpt``: at every train-epoch end) and the command that resumes from it.

    Args:
        resume: the command that resumes this run (:func:`resume_command`).
    """

    def __init__(self, resume: str) -> None:
        self.resume = resume
        self._saved: tuple[int, int] | None = None

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        device = trainer.strategy.root_device
        threads = torch.get_num_threads()
        where = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"{threads} thread{'s' * (threads > 1)}"
        )
        print(f"device: {device.type} ({where}), {trainer.world_size} process(es), precision {trainer.precision}")

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        """The small-data line (:func:`robust.learned.small_data_advice`), unless the run limits its batches itself."""
        data = trainer.datamodule
        images = len(getattr(data, "train_set", None) or ())
        if not images or trainer.limit_train_batches != 1.0 or not math.isfinite(trainer.estimated_stepping_batches):
            return
        advice = small_data_advice(
            images,
            data.batch_size,
            int(trainer.estimated_stepping_batches),
            pl_module.hparams.get("weights") is not None,
            getattr(data, "augment", None),
        )
        if advice:
            print(advice, flush=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._saved = (checkpoint.get("epoch", 0), checkpoint.get("global_step", 0))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not trainer.is_global_zero or not isinstance(exception, KeyboardInterrupt | SystemExit):
            return
        what = "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        at = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        last = next((cb for cb in trainer.checkpoint_callbacks if cb.monitor is None), None)
        path = getattr(last, "best_model_path", "") or getattr(last, "last_model_path", "")
        if not path:
            print(
                f"interrupted ({what}) at {at}: nothing saved yet (last.ckpt comes at an epoch's end); rerun: "
                f"{self.resume.removesuffix(' --ckpt_path last')}",
                flush=True,
            )
            return
        when = f" (epoch {self._saved[0]}, step {self._saved[1]})" if self._saved else ""
        print(f"interrupted ({what}) at {at}; saved {path}{when}; resume: {self.resume}", flush=True)


# Lightning's info lines that say nothing to a user of this project (exact texts; the device lines are replaced
# by RunNotices' one, the interrupt line by its own).
QUIET_INFO = (
    re.compile(r"💡 Tip: For seamless cloud logging and experiment tracking, try installing \[litlogger\]"),
    re.compile(r"GPU available: (True|False)"),
    re.compile(r"TPU available: (True|False), using: \d+ TPU cores"),
    re.compile(r"Loading `train_dataloader` to estimate number of stepping batches\.$"),
    re.compile(r"\nDetected KeyboardInterrupt, attempting graceful shutdown \.\.\.$"),
)
# torch 2.15 deprecates what Lightning 2.6.6's _pytree still calls; harmless until Lightning changes it.
QUIET_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated, use `isinstance\(treespec, TreeSpec\) and",)


class _QuietInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in QUIET_INFO)


def quiet_known_noise(resuming: bool = False) -> None:
    """Filter :data:`QUIET_INFO` from Lightning's rank-zero log and :data:`QUIET_WARNINGS`; on a resume, also
    ModelCheckpoint's "exists and is not empty" (the resumed run's folder is meant to hold its checkpoints)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietInfo) for f in logger.filters):
            logger.addFilter(_QuietInfo())
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if resuming:
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty\.$")
