"""The command line's defaults: the eps a report measures, where it writes, its resume journal, the device.

What ``evaluate.py`` fills in when the user leaves an option out; the library functions themselves take every value
explicitly.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from robust.card import ModelCard
from robust.errors import RobustError
from robust.hf import HF_PREFIX
from robust.sharding import Journal


def default_eps(card: ModelCard) -> float:
    """The eps a model was adversarially trained at (from its card), else 8/255."""
    eps = card.training.eps
    trained = card.training.attack not in (None, "none") and eps is not None
    return float(eps) if trained and 0 < eps <= 1 else 8 / 255


def default_out(spec: str, data: str) -> Path:
    """``reports/<model>-<data>``, from the model spec and data names (file-name safe)."""
    name = f"{Path(str(spec).removeprefix(HF_PREFIX)).stem}-{Path(data).name or data}"
    return Path("reports") / re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def report_journal(
    out: str | Path, model_info: dict, data_info: dict, batch_size: int, device: torch.device, resume: bool
) -> Journal:
    """The journal of the report written to ``out`` (in ``out/.cache``), valid for this model and data identity
    (:func:`robust.report.model_identity`, :func:`robust.eval_data.eval_data`), batch size, device type and torch
    version; read back only when ``resume``."""
    identity = {
        "model": model_info,
        "data": data_info,
        "batch_size": batch_size,
        "device": device.type,
        "torch": torch.__version__,
    }
    return Journal(Path(out) / ".cache", identity, resume)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; unavailable CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RobustError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RobustError("--device cuda was asked for, but CUDA is not available here")
    return device
