"""Load trained models for evaluation, and export them for deployment.

``load_model(spec)`` returns the ``nn.Sequential(Normalize, backbone)`` in eval mode, on CPU, with a
``card`` dict attribute (the model card: arch, num_classes, class_names, image_size, resize, mean, std, ...).

``export_model(checkpoint, out)`` writes a deployment folder (all or nothing):

- ``model.safetensors``: the state dict of that ``Sequential`` (keys ``normalize.mean``, ``normalize.std``,
  ``backbone.<torchvision key>``), float32; no pickle, so loading it can never run code;
- ``model.json``: the model card, fields in :data:`CARD_FIELDS`;
- ``model.pt2`` (``torch_export=True``): a ``torch.export`` program, input ``N×3×image_size×image_size`` in [0, 1].
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from robust.checkpointing import atomic_write_bytes, load_checkpoint
from robust.errors import RobustError
from robust.models import IMAGENET_MEAN, IMAGENET_STD, Normalize, build_model, imagenet_class_names

FORMAT = "robust-export"
FORMAT_VERSION = 1
WEIGHTS_FILE, CARD_FILE, PROGRAM_FILE = "model.safetensors", "model.json", "model.pt2"

#: The fields of ``model.json``: name -> (JSON type, meaning). ``float`` also accepts a JSON integer.
CARD_FIELDS: dict[str, tuple[str, str]] = {
    "format": ("str", f"always {FORMAT!r}"),
    "format_version": ("int", f"{FORMAT_VERSION}; readers refuse other versions"),
    "arch": ("str", "torchvision architecture of the backbone: resnet18, resnet34 or resnet50"),
    "num_classes": ("int", "number of output logits"),
    "class_names": ("list[str]", "name of each output, num_classes entries"),
    "image_size": ("int", "input height and width in pixels (center crop)"),
    "resize": ("int", "short side to resize images to before the center crop"),
    "mean": ("list[float]", "per-channel mean of the built-in normalization (RGB)"),
    "std": ("list[float]", "per-channel std of the built-in normalization (RGB)"),
    "cifar_stem": ("bool", "3×3 stride-1 conv1 and no max-pool (32×32 inputs) instead of torchvision's stem"),
    "data": ("str|null", "training data module name, e.g. Digits, CIFAR10, ImageFolder"),
    "training": ("dict", "attack, target, eps, alpha (null: the attack's default), adv_ratio, attack_steps"),
    "robustness": ("dict", "val metrics (accuracies, loss), eps, steps, jpeg_quality; best, epoch, global_step"),
    "versions": ("dict", "library versions at export: python, torch, torchvision, lightning, safetensors, robust"),
    "created": ("str", "export time, ISO 8601 UTC"),
    "files": ("dict", f"sha256 (hex) of each file of the export; always has {WEIGHTS_FILE!r}"),
}


def card_from_checkpoint(ckpt: dict) -> dict:
    """The model card fields known from a Lightning checkpoint of :class:`AdversarialClassifier`."""
    hp = dict(ckpt.get("hyper_parameters") or {})
    data = dict(ckpt.get("robust_data") or {})
    num_classes = int(hp.get("num_classes", 10))
    names = hp.get("class_names") or data.get("class_names") or [str(i) for i in range(num_classes)]
    size = int(data.get("image_size", 32))
    return {
        "arch": hp.get("arch", "resnet18"), "num_classes": num_classes, "class_names": list(names),
        "cifar_stem": bool(hp.get("cifar_stem", False)), "mean": list(hp.get("mean", IMAGENET_MEAN)),
        "std": list(hp.get("std", IMAGENET_STD)),
        "image_size": size, "resize": int(data.get("resize") or size), "data": data.get("name"),
        "training": {k: hp.get(k) for k in ("attack", "target", "eps", "alpha", "adv_ratio", "attack_steps")},
    }  # fmt: skip


def _load_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` with one clear sentence for missing, extra or mis-shaped tensors."""
    expected = model.state_dict()
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        raise RobustError(f"{source} does not fit its model description: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, tensor in expected.items():
        shape = tuple(getattr(state[key], "shape", ()))
        if not isinstance(state[key], Tensor) or shape != tuple(tensor.shape):
            raise RobustError(f"{source} does not fit its model description: {key} has shape {shape}, "
                              f"the model needs {tuple(tensor.shape)}")  # fmt: skip
    model.load_state_dict(state)


def _model_from_card(card: dict, state: dict[str, Tensor], source: str) -> nn.Module:
    """The network ``card`` describes, holding ``state``, eval mode, with ``card`` attached."""
    model = build_model(card["arch"], card["num_classes"], None, card["mean"], card["std"], card["cifar_stem"])
    _load_state(model, state, source)
    model.card = card
    return model.eval()


def _model_from_ckpt(ckpt: dict, path: str | Path) -> nn.Module:
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise RobustError(f"{path} is not a checkpoint of robust.module.AdversarialClassifier (no 'model.' weights)")
    return _model_from_card(card_from_checkpoint(ckpt), state, str(path))


def model_from_checkpoint(path: str | Path) -> nn.Module:
    """The trained network of a ``.ckpt`` (loaded with ``weights_only=True``), eval mode, with ``card``."""
    return _model_from_ckpt(load_checkpoint(path), path)


def imagenet_model() -> nn.Module:
    """torchvision's ImageNet ResNet18 (downloaded by torchvision for online users) with its card."""
    model = build_model("resnet18", 1000, "imagenet", IMAGENET_MEAN, IMAGENET_STD)
    model.card = {
        "arch": "resnet18", "num_classes": 1000, "class_names": imagenet_class_names(), "cifar_stem": False,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "image_size": 224, "resize": 256,
        "data": "ImageNet", "training": {"attack": "none"},
    }  # fmt: skip
    return model.eval()


# ---- export ------------------------------------------------------------------------------------


def _robustness(ckpt: dict) -> dict:
    """The validation figures a checkpoint carries (``robust_metrics``, ModelCheckpoint's best score)."""
    hp = dict(ckpt.get("hyper_parameters") or {})
    metrics = {k.removeprefix("val/"): float(v) for k, v in (ckpt.get("robust_metrics") or {}).items()}
    best = None
    for state in (ckpt.get("callbacks") or {}).values():  # ModelCheckpoint or a subclass: keyed by its class name
        if isinstance(state, dict) and state.get("monitor") and state.get("best_model_score") is not None:
            best = {"monitor": state["monitor"], "score": float(state["best_model_score"])}
            break
    return {
        "metrics": metrics, "eps": hp.get("eps") if hp.get("val_eps") is None else hp["val_eps"],
        "steps": hp.get("val_steps"), "jpeg_quality": hp.get("jpeg_quality"), "best": best,
        "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step"),
    }  # fmt: skip


def _versions() -> dict[str, str]:
    """Versions of Python and the libraries that made the export (torch with its build tag, e.g. ``+cu132``)."""
    import platform

    import lightning
    import torchvision

    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "lightning": lightning.__version__,
            "safetensors": safetensors.__version__, "robust": importlib.metadata.version("robust")}  # fmt: skip


def _torch_export(model: nn.Module, image_size: int, path: Path) -> None:
    """Save ``model`` as a ``torch.export`` program with a dynamic batch dimension."""
    example = torch.rand(2, 3, image_size, image_size)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:
        raise RobustError(f"torch.export could not trace the model ({type(exc).__name__}: {exc})") from None
    torch.export.save(program, path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_target(out: Path) -> None:
    """Refuse to write over anything in ``out`` but a previous export (or an empty folder)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RobustError(f"export folder {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CARD_FILE).is_file():
        raise RobustError(f"{out} is a non-empty folder that is not an export; refusing to overwrite it")


def _install(tmp: Path, out: Path) -> None:
    """Move the finished export ``tmp`` to ``out``, replacing a previous export there. The temp files' private
    modes (0700 / 0600) become the usual ones under the umask, so other users and containers can read them."""
    _check_target(out)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for path in tmp.iterdir():
        path.chmod(0o666 & ~umask)
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


def export_model(checkpoint: str | Path, out: str | Path, torch_export: bool = False) -> Path:
    """Export a Lightning checkpoint of :class:`AdversarialClassifier` to the folder ``out`` and return it.

    Writes ``model.safetensors``, ``model.json`` (see :data:`CARD_FIELDS`) and, with ``torch_export``,
    ``model.pt2``, into a temp folder beside ``out`` that is renamed to ``out`` when complete. A previous
    export in ``out`` is replaced; a non-empty folder that is not an export is refused (RobustError).
    """
    ckpt = load_checkpoint(checkpoint)
    model = _model_from_ckpt(ckpt, checkpoint)
    out = Path(out)
    _check_target(out)
    weights = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, {"format": "pt"})
    card = {"format": FORMAT, "format_version": FORMAT_VERSION, **model.card, "robustness": _robustness(ckpt),
            "versions": _versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {WEIGHTS_FILE: _sha256(weights)}}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        atomic_write_bytes(tmp / WEIGHTS_FILE, weights)
        if torch_export:
            _torch_export(model, card["image_size"], tmp / PROGRAM_FILE)
            card["files"][PROGRAM_FILE] = _sha256((tmp / PROGRAM_FILE).read_bytes())
        atomic_write_bytes(tmp / CARD_FILE, (json.dumps(card, indent=2) + "\n").encode())
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- loading an export -------------------------------------------------------------------------


def _has_type(value: object, kind: str) -> bool:
    if kind.endswith("|null") and value is None:
        return True
    kind = kind.removesuffix("|null")
    if kind.startswith("list["):
        return isinstance(value, list) and all(_has_type(v, kind[5:-1]) for v in value)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {"str": str, "bool": bool, "dict": dict}[kind])


def validate_card(card: object, source: str = CARD_FILE) -> dict:
    """Check a parsed ``model.json`` against :data:`CARD_FIELDS` and its own consistency; return it."""
    if not isinstance(card, dict):
        raise RobustError(f"{source} must hold a JSON object")
    for name, (kind, meaning) in CARD_FIELDS.items():
        if name not in card:
            raise RobustError(f"{source} has no {name!r} field ({meaning})")
        if not _has_type(card[name], kind):
            raise RobustError(f"{source}: field {name!r} must be {kind}, got {card[name]!r:.80}")
    if card["format"] != FORMAT or card["format_version"] != FORMAT_VERSION:
        raise RobustError(f"{source} is format {card['format']!r} version {card['format_version']}; "
                          f"this library reads {FORMAT!r} version {FORMAT_VERSION}")  # fmt: skip
    if len(card["class_names"]) != card["num_classes"]:
        raise RobustError(f"{source} has {len(card['class_names'])} class names for {card['num_classes']} classes")
    if len(card["mean"]) != 3 or len(card["std"]) != 3:
        raise RobustError(f"{source}: mean and std need 3 values (RGB)")
    if not isinstance(card["files"].get(WEIGHTS_FILE), str):
        raise RobustError(f"{source}: 'files' has no sha256 for {WEIGHTS_FILE}")
    return card


def model_from_export(folder: str | Path) -> nn.Module:
    """The model of an export folder (checked against its card and sha256 sums), eval mode, with ``card``."""
    folder = Path(folder)
    card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
    if not card_path.is_file():
        raise RobustError(f"{folder} is not an export folder (no {CARD_FILE})")
    try:
        card = json.loads(card_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RobustError(f"{card_path} is not valid JSON ({exc})") from None
    validate_card(card, str(card_path))
    for name, digest in card["files"].items():
        path = folder / Path(name).name
        if not path.is_file():
            raise RobustError(f"{folder} is incomplete: {name} is listed in {CARD_FILE} but missing")
        data = path.read_bytes()
        if _sha256(data) != digest:
            raise RobustError(f"{path} does not match the sha256 in {CARD_FILE}; the file was changed or corrupted")
        if name == WEIGHTS_FILE:
            weights = data
    try:
        state = safetensors.torch.load(weights)
    except Exception as exc:
        raise RobustError(f"{weights_path} is not a readable safetensors file ({exc})") from None
    model = _model_from_card(card, state, str(weights_path))
    for key in ("mean", "std") if isinstance(getattr(model, "normalize", None), Normalize) else ():
        if model.normalize.get_buffer(key).flatten().tolist() != torch.tensor(card[key]).tolist():
            raise RobustError(f"{weights_path} normalizes with a different {key} than {CARD_FILE} states")
    return model


def load_model(spec: str | Path) -> nn.Module:
    """Load a model for evaluation: eval mode, CPU, with a ``model.card`` dict.

    ``spec`` is an export folder (or its ``model.json`` / ``model.safetensors`` / ``model.pt2``), a Lightning
    checkpoint (``.ckpt``, loaded with ``weights_only=True``), ``"imagenet"`` (torchvision's ImageNet ResNet18)
    or ``"hf:<model id or local dir>"`` (a Hugging Face classifier).
    """
    text = str(spec)
    if text == "imagenet":
        return imagenet_model()
    if text.startswith("hf:"):
        from robust.hf import load_hf_model

        return load_hf_model(text[3:])
    path = Path(spec)
    if path.is_dir():
        return model_from_export(path)
    if path.is_file() and path.suffix in (".json", ".safetensors", ".pt2"):
        return model_from_export(path.parent)
    if path.is_file():
        return model_from_checkpoint(path)
    raise RobustError(
        f"model {text!r} not found: give an export folder, a .ckpt file, 'imagenet' or 'hf:<model id or dir>'"
    )
