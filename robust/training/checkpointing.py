"""Lightning checkpoints: atomic writes (temp file beside the target + rename), ``weights_only=True`` loads, and the
choice of the best one (:class:`BestCheckpoint`: never a model that has not learned over one that has)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from robust.files import atomic_write_bytes, load_checkpoint
from robust.learned import not_learned
from robust.threats import val_tag


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with what it lacks for a SIGKILL-safe ``last.ckpt``: Lightning stages the file
    in the system temp folder (fsspec), so when that is another filesystem the final move is a copy a kill can
    truncate, and nothing is fsynced; here the temp file sits beside the target (:func:`atomic_write_bytes`, which
    also gives it the umask's mode). Loads use ``weights_only=True`` with one clear sentence for a bad or untrusted
    file. Passed to the Trainer as ``plugins=`` (train.py)."""

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: Any | None = None) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(path, buf.getvalue())

    def load_checkpoint(self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None):
        return load_checkpoint(path, map_location=map_location or "cpu")


# A model that has not learned ranks below every one that has: its score moves this far down (up for mode min),
# further than any accuracy or loss goes, and back up for the closing lines and the card (real_score).
NOT_LEARNED_OFFSET = 1e6


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose choice never crowns a model that has not learned over one that has
    (:func:`robust.learned.not_learned`: clean accuracy within 10 points of chance, or one class for nearly every
    image): a constant classifier is never fooled "differently", so its robust accuracy can beat a real model's.
    When no validation has learned, the best of those is kept and :func:`robust.training.runfiles.run_summary` says so.

    Args:
        learned_first: rank models that have not learned below every one that has (false: by the monitor alone).
    """

    def __init__(self, *args, learned_first: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.learned_first = learned_first
        self.verdicts: dict[str, str | None] = {}  # checkpoint path -> why its model has not learned, or None

    def verdict(self, trainer, metrics: dict) -> str | None:
        """Why the model just validated has not learned (None: it has, or nothing tells)."""
        module = trainer.lightning_module
        tag = val_tag("clean", module.hparams.get("norm", "linf"))
        clean, top, classes = metrics.get(tag), metrics.get("val/top_class"), module.hparams.get("num_classes")
        if clean is None or classes is None:
            return None
        return not_learned(float(clean), classes, None if top is None else float(top))

    def _save_monitor_checkpoint(self, trainer, monitor_candidates: dict) -> None:
        current = monitor_candidates.get(self.monitor)
        reason = self.verdict(trainer, monitor_candidates) if self.learned_first else None
        if current is not None and reason is not None:  # in float64: float32 keeps no digits of an accuracy at 1e6
            current = current.double() + (-NOT_LEARNED_OFFSET if self.mode == "max" else NOT_LEARNED_OFFSET)
        before = self._last_checkpoint_saved
        if self.check_monitor_top_k(trainer, current):
            self._update_best_and_save(current, trainer, monitor_candidates)
        if self._last_checkpoint_saved != before:
            self.verdicts[self._last_checkpoint_saved] = reason

    def real_score(self) -> float | None:
        """The monitored value of the best checkpoint, as measured (without the not-learned offset)."""
        if self.best_model_score is None:
            return None
        score = float(self.best_model_score)
        if abs(score) > NOT_LEARNED_OFFSET / 2:
            score += NOT_LEARNED_OFFSET if score < 0 else -NOT_LEARNED_OFFSET
        return score

    def best_not_learned(self) -> str | None:
        """Why the best checkpoint's model has not learned, or None when it has."""
        if not self.best_model_path:
            return None
        if self.best_model_path in self.verdicts:
            return self.verdicts[self.best_model_path]
        # chosen before a resume: only the offset remains
        offset = self.best_model_score is not None and abs(float(self.best_model_score)) > NOT_LEARNED_OFFSET / 2
        return "it had not learned when it was validated" if offset else None
