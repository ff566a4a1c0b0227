"""The command line's defaults: the eps a report measures, where it writes, its resume journal, the device.

What ``evaluate.py`` fills in when the user leaves an option out; the library functions themselves take every value
explicitly.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from robust.errors import RobustError
from robust.evaluation.sharding import Journal
from robust.models.card import ModelCard
from robust.models.hf import HF_PREFIX


def default_eps(card: ModelCard) -> float:
    """The eps a model was adversarially trained at (from its card), else 8/255."""
    eps = card.training.eps
    trained = card.training.attack not in (None, "none") and eps is not None
    return float(eps) if trained and 0 < eps <= 1 else 8 / 255


SPLIT_NAMES = ("train", "test", "val", "valid", "validation")  # a folder so named is named with its parent


def model_name(spec: str) -> str:
    """A model spec as a report folder names it: a checkpoint by its real file (links such as ``best.ckpt``
    followed) with the run it came from, ``<logger name>-version_N-<file>``; anything else by its last name."""
    path = Path(str(spec).removeprefix(HF_PREFIX))
    if path.suffix != ".ckpt" or not path.exists():
        return path.stem if path.suffix else path.name
    real = path.resolve()
    parts = real.parent.parts
    if real.parent.name == "checkpoints" and len(parts) >= 3 and parts[-2].startswith("version_"):
        return f"{parts[-3]}-{parts[-2]}-{real.stem}"
    return real.stem


def data_name(data: str) -> str:
    """A data spec as a report folder names it: a data set by its name, a folder by its last name (with its
    parent's when that is a split: ``pets-test``)."""
    path = Path(data)
    if path.name.lower() in SPLIT_NAMES and path.parent.name:
        return f"{path.resolve().parent.name}-{path.name}"
    return path.name or data


def default_out(spec: str, data: str) -> Path:
    """``reports/<model>-<data>`` (:func:`model_name`, :func:`data_name`; file-name safe)."""
    return Path("reports") / re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model_name(spec)}-{data_name(data)}")


def report_folder(out: Path, model_info: dict, chosen: bool) -> tuple[Path, str | None]:
    """Where a report of the model ``model_info`` (:func:`robust.evaluation.report.model_identity`) goes, and a one-line
    notice: ``out``, unless it holds another model's report (another file, or the same file with other weights);
    then, for a default folder, the first free ``out-2``, ``out-3``, ...; a folder the user ``chosen`` is replaced,
    saying so."""
    import json

    def other_model(folder: Path) -> str | None:
        try:
            held = json.loads((folder / "report.json").read_text()).get("model", {})
        except (OSError, ValueError):
            return None
        same = {k: held.get(k) for k in ("spec", "path", "sha256")} == {
            k: model_info.get(k) for k in ("spec", "path", "sha256")
        }
        return None if same else str(held.get("path") or held.get("spec"))

    other = other_model(out)
    if other is None:
        return out, None
    if chosen:
        return out, f"report: replacing the report of {other} in {out}"
    n = 2
    while other_model(free := out.with_name(f"{out.name}-{n}")) is not None:
        n += 1
    return free, f"report: {out} holds the report of {other}; writing {free}"


def report_journal(
    out: str | Path, model_info: dict, data_info: dict, batch_size: int, device: torch.device, resume: bool
) -> Journal:
    """The journal of the report written to ``out`` (in ``out/.cache``), valid for this model and data identity
    (:func:`robust.evaluation.report.model_identity`, :func:`robust.data.eval_data.eval_data`), batch size, device type
    and torch
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


def check_accelerator(accelerator: object, devices: object) -> None:
    """One line, before Lightning's traceback would come, for a Trainer ``accelerator`` this machine lacks (``gpu``
    where torch sees none), an unknown one, or ``devices`` it cannot give; Lightning's own registry and device
    parsing decide. An Accelerator object is left to Lightning."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.accelerators import AcceleratorRegistry, CPUAccelerator, CUDAAccelerator, MPSAccelerator

    from robust.cli import did_you_mean

    if not isinstance(accelerator, str | None):
        return
    name = (accelerator or "auto").lower()
    gpus = [cls for cls in (CUDAAccelerator, MPSAccelerator) if cls.is_available()]
    if name in ("auto", "gpu"):
        if name == "gpu" and not gpus:
            raise RobustError(
                "--trainer.accelerator gpu: this machine has no GPU that torch can use; use --trainer.accelerator "
                "cpu, or auto (a GPU where there is one)"
            )
        cls = (gpus or [CPUAccelerator])[0]
    elif name in AcceleratorRegistry:
        cls = AcceleratorRegistry[name]["accelerator"]
        if not cls.is_available():
            raise RobustError(
                f"--trainer.accelerator {name}: not available on this machine; use --trainer.accelerator cpu, or auto"
            )
    else:
        names = ["auto", "gpu", *AcceleratorRegistry.available_accelerators()]
        raise RobustError(
            f"--trainer.accelerator {accelerator}: unknown{did_you_mean(name, names)}; one of {', '.join(names)}"
        )
    if devices in (None, "auto"):
        return
    try:
        cls.parse_devices(devices)
    except (MisconfigurationException, TypeError, ValueError):
        kind = "CPU processes" if cls is CPUAccelerator else f"this machine's {cls.auto_device_count()} GPU(s)"
        raise RobustError(
            f"--trainer.devices {devices}: not a number of {kind}; use a whole number from 1"
            + ("" if cls is CPUAccelerator else f" to {cls.auto_device_count()}, a list of GPU ids")
            + ", or auto"
        ) from None
