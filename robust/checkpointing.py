"""Safe checkpoint I/O: atomic writes (temp file + rename) and ``weights_only=True`` loads with clear errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from robust.errors import RobustError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_files(out: str | Path, blobs: dict[str, bytes]) -> None:
    """Write each ``name -> bytes`` of ``blobs`` into folder ``out`` with :func:`atomic_write_bytes`.

    Render everything before calling, so a failure never leaves a half-written set; OSError -> RobustError.
    """
    out = Path(out)
    try:
        for name, data in blobs.items():
            atomic_write_bytes(out / name, data)
    except OSError as exc:
        raise RobustError(f"cannot write into {out}: {exc.strerror or exc}") from None


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a ``.ckpt`` with ``weights_only=True`` (no pickled code can run); bad files raise RobustError."""
    path = Path(path)
    if not path.is_file():
        raise RobustError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        if "GLOBAL" in str(exc) or "Unsupported global" in str(exc):
            raise RobustError(f"{path} holds pickled objects other than weights; refusing to load it "
                              "(it could run code)") from None  # fmt: skip
        raise RobustError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise RobustError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O whose writes are atomic (a kill never leaves a truncated ``last.ckpt``)
    and whose loads use ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: Any | None = None) -> None:
        import io

        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(path, buf.getvalue())

    def load_checkpoint(self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None):
        return load_checkpoint(path, map_location=map_location or "cpu")


class RobustCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` (with ``save_last``) is rewritten at every train-epoch end.

    Lightning 2.6 writes ``last.ckpt`` only when a top-k checkpoint was written at the same step, so with a
    monitored metric that stops improving, or validation every n > 1 epochs, ``last.ckpt`` lags behind and
    ``--ckpt_path last`` would redo epochs. Top-k choices are unchanged: they still follow validation.
    """

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
