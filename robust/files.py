"""Safe file I/O without Lightning: atomic writes that honour the umask, and ``weights_only=True`` checkpoint loads.

Writes go to a temp file in the target's folder, then ``os.replace``: a reader sees the old file or the new
one, never half of one. ``mkstemp`` creates the temp file private (0600); before the rename it gets the mode a
plain ``open()`` would give (``0o666 & ~umask``), so other users and containers can read what the project writes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from robust.errors import RobustError


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``: all or nothing.
    The file ends with mode ``0o666 & ~umask``, like a file made by ``open(path, "wb")``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
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
            raise RobustError(
                f"{path} holds pickled objects other than weights; refusing to load it (it could run code)"
            ) from None
        raise RobustError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise RobustError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as 64 hex digits (what export cards record for each file)."""
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    """The sha256 of a file's bytes, or of a folder (each file's relative path, a NUL, its bytes, in sorted
    order), read in 1 MiB chunks: 64 hex digits."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
