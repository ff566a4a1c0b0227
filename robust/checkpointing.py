"""Lightning checkpoint I/O: atomic writes (temp file beside the target + rename) and ``weights_only=True`` loads."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from robust.files import atomic_write_bytes, load_checkpoint


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
