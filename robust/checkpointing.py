"""Safe checkpoint I/O: atomic writes (temp file + rename) and ``weights_only=True`` loads with clear errors."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from robust.errors import RobustError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and ``os.replace``: all or nothing.
    The file gets the mode any other tool would create (``0o666`` less the umask), not the temp file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
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
    """Lightning's checkpoint I/O with what it lacks for a SIGKILL-safe ``last.ckpt``: Lightning stages the file
    in the system temp folder (fsspec), so when that is another filesystem the final move is a copy a kill can
    truncate, and nothing is fsynced; here the temp file sits beside the target. Loads use ``weights_only=True``
    with one clear sentence for a bad or untrusted file. Passed to the Trainer as ``plugins=``."""

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: Any | None = None) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(path, buf.getvalue())

    def load_checkpoint(self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None):
        return load_checkpoint(path, map_location=map_location or "cpu")
