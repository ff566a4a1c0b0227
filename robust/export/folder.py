"""Export trained checkpoints for deployment (load them back with :func:`robust.load_model`).

``export_model(checkpoint, out)`` writes a deployment folder (all or nothing):

- ``model.safetensors``: the state dict of the model (keys ``normalize.mean``, ``normalize.std``,
  ``backbone.<torchvision key>``), float32; no pickle, so loading it can never run code;
- ``model.json``: the model card, :class:`robust.models.card.ModelCard` (fields and meanings: ``ModelCard.schema()``);
- ``model.pt2`` (``torch_export=True``): a ``torch.export`` program, input ``N×C×image_size×image_size`` in [0, 1];
- ``model.onnx`` (``onnx=True``, the ``onnx`` extra): the same model in ONNX (:mod:`robust.export.onnx`), checked in
  onnxruntime against torch before anything is written; the card's ``onnx`` field records the check.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from robust.errors import RobustError
from robust.export.onnx import PACKAGES as ONNX_PACKAGES
from robust.export.onnx import export_onnx, require_onnx
from robust.files import atomic_write_bytes, current_umask, load_checkpoint, sha256_hex
from robust.models.resolve import CARD_FILE, ONNX_FILE, PROGRAM_FILE, WEIGHTS_FILE, model_from_ckpt


def _versions(onnx: bool) -> dict[str, str]:
    """Versions of Python and the libraries that made the export (torch with its build tag, e.g. ``+cu132``)."""
    import platform

    import lightning
    import torchvision

    versions = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "lightning": lightning.__version__,
        "safetensors": safetensors.__version__,
        "robust": importlib.metadata.version("robust"),
    }
    return versions | ({name: importlib.metadata.version(name) for name in ONNX_PACKAGES} if onnx else {})


def _torch_export(model: nn.Module, image_size: int, channels: int, path: Path) -> None:
    """Save ``model`` as a ``torch.export`` program with a dynamic batch dimension."""
    example = torch.rand(2, channels, image_size, image_size)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:
        raise RobustError(f"torch.export could not trace the model ({type(exc).__name__}: {exc})") from None
    torch.export.save(program, path)


def _check_target(out: Path) -> None:
    """Refuse to write over anything in ``out`` but a previous export (or an empty folder)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RobustError(f"export folder {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CARD_FILE).is_file():
        raise RobustError(f"{out} is a non-empty folder that is not an export; refusing to overwrite it")


def _install(tmp: Path, out: Path) -> None:
    """Move the finished export ``tmp`` to ``out``, replacing a previous export there. The temp folder's private
    mode (0700) becomes the usual one under the umask, so other users and containers can read it."""
    _check_target(out)
    tmp.chmod(0o777 & ~current_umask())
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old)


def export_model(
    checkpoint: str | Path,
    out: str | Path,
    torch_export: bool = False,
    onnx: bool = False,
    onnx_data: str | None = None,
) -> Path:
    """Export a Lightning checkpoint of :class:`AdversarialClassifier` to the folder ``out`` and return it.

    Writes ``model.safetensors``, ``model.json`` (the checkpoint's :class:`~robust.models.card.ModelCard`, completed
    with versions, time and sha256 sums), with ``torch_export`` ``model.pt2`` and with ``onnx`` ``model.onnx``
    (checked in onnxruntime on ``onnx_data``, see :func:`robust.export.onnx.check_batch`; RobustError when it
    disagrees with torch), into a temp folder beside ``out`` that is renamed to ``out`` when complete. A previous
    export in ``out`` is replaced; a non-empty folder that is not an export is refused (RobustError).
    """
    if onnx:
        require_onnx()
    model = model_from_ckpt(load_checkpoint(checkpoint), str(checkpoint))
    out = Path(out)
    _check_target(out)
    weights = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, {"format": "pt"})
    card = dataclasses.replace(
        model.card,
        versions=_versions(onnx),
        files={WEIGHTS_FILE: sha256_hex(weights)},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if onnx:
        onnx_model, card.onnx = export_onnx(model, onnx_data)
        card.files[ONNX_FILE] = sha256_hex(onnx_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        atomic_write_bytes(tmp / WEIGHTS_FILE, weights)
        if torch_export:
            _torch_export(model, card.image_size, card.channels, tmp / PROGRAM_FILE)
            card.files[PROGRAM_FILE] = sha256_hex((tmp / PROGRAM_FILE).read_bytes())
        if onnx:
            atomic_write_bytes(tmp / ONNX_FILE, onnx_model)
        atomic_write_bytes(tmp / CARD_FILE, card.to_json().encode())
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
