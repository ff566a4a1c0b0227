"""Load models for evaluation: ``load_model(spec)``, the one place that tells the kinds of model apart.

Every loaded model is a :class:`robust.models.CardedModel` (input ``N×3×H×W`` in [0, 1], logits out) in eval
mode, on CPU, whose ``card`` is its :class:`robust.card.ModelCard`. No Lightning import: checkpoints are read as
plain dicts with ``weights_only=True``.

An export folder holds ``model.safetensors`` (the model's state dict, float32, keys ``normalize.mean``,
``normalize.std``, ``backbone.<torchvision key>``), ``model.json`` (the card) and optionally ``model.pt2`` (a
``torch.export`` program) and ``model.onnx``; :mod:`robust.export` writes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from robust.card import ModelCard
from robust.errors import RobustError
from robust.files import load_checkpoint, sha256_hex
from robust.hf import HF_PREFIX, load_hf_model
from robust.models import IMAGENET_MEAN, IMAGENET_STD, CardedModel, Normalize, build_model, imagenet_class_names

WEIGHTS_FILE, CARD_FILE, PROGRAM_FILE, ONNX_FILE = "model.safetensors", "model.json", "model.pt2", "model.onnx"
CARD_KEY = "robust_card"  # where a checkpoint keeps its card (a dict, ModelCard.to_dict())
TRAINING_KEYS = ("attack", "target", "eps", "alpha", "adv_ratio", "attack_steps", "nfgsm_noise", "objective", "beta",
                 "ema_decay")  # fmt: skip


def build_classifier(
    arch: str,
    num_classes: int | None = None,
    weights: str | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    cifar_stem: bool = False,
) -> nn.Sequential:
    """A new classifier in train mode: :func:`robust.models.build_model` for a torchvision ``arch``, or for
    ``"hf:<model id or dir>"`` a Hugging Face classifier with its own preprocessing (:func:`robust.hf.load_hf_model`;
    head replaced when ``num_classes`` differs; ``weights``, ``mean``, ``std``, ``cifar_stem`` unused)."""
    if arch.startswith(HF_PREFIX):
        return load_hf_model(arch.removeprefix(HF_PREFIX), num_classes).train()
    if num_classes is None:
        raise RobustError(f"arch {arch!r} needs num_classes")
    return build_model(arch, num_classes, weights, mean, std, cifar_stem)


def training_card(
    hparams: Mapping,
    data: Mapping | None,
    metrics: Mapping,
    *,
    alpha: float | None,
    best: dict | None,
    epoch: int | None,
    global_step: int | None,
) -> ModelCard:
    """The card of an :class:`~robust.module.AdversarialClassifier` with ``hparams``, trained on a data module that
    ``describe()``s itself as ``data``; ``metrics`` are its latest ``val/*`` figures, ``alpha`` the training step in
    force (a guard rollback changes it), ``best`` the checkpoint callback's ``{"monitor", "score"}`` (or None)."""
    hp, data = dict(hparams), dict(data or {})
    num_classes = int(hp.get("num_classes", 10))
    size = int(data.get("image_size", 32))
    names = hp.get("class_names") or data.get("class_names") or [str(i) for i in range(num_classes)]
    robustness = {
        "metrics": {k.removeprefix("val/"): float(v) for k, v in metrics.items() if k.startswith("val/")},
        "eps": hp.get("eps") if hp.get("val_eps") is None else hp["val_eps"], "steps": hp.get("val_steps"),
        "jpeg_quality": hp.get("jpeg_quality"), "best": best, "epoch": epoch, "global_step": global_step,
    }  # fmt: skip
    return ModelCard(
        arch=hp.get("arch", "resnet18"), num_classes=num_classes, class_names=[str(n) for n in names],
        image_size=size, resize=int(data.get("resize") or size), mean=[float(m) for m in hp.get("mean", IMAGENET_MEAN)],
        std=[float(s) for s in hp.get("std", IMAGENET_STD)], cifar_stem=bool(hp.get("cifar_stem", False)),
        data=data.get("name"), training={**{k: hp.get(k) for k in TRAINING_KEYS}, "alpha": alpha},
        robustness=robustness,
    )  # fmt: skip


def card_from_checkpoint(ckpt: dict, source: str) -> ModelCard:
    """The card a checkpoint stores; for checkpoints written before cards were stored, the one its
    hyper-parameters describe (training alpha as configured, no best score)."""
    if CARD_KEY in ckpt:
        return ModelCard.from_dict(ckpt[CARD_KEY], f"the model card in {source}")
    hp = dict(ckpt.get("hyper_parameters") or {})
    return training_card(hp, ckpt.get("robust_data"), ckpt.get("robust_metrics") or {}, alpha=hp.get("alpha"),
                         best=None, epoch=ckpt.get("epoch"), global_step=ckpt.get("global_step"))  # fmt: skip


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


def _model_from_card(card: ModelCard, state: dict[str, Tensor], source: str) -> CardedModel:
    """The network ``card`` describes, holding ``state``, eval mode."""
    model = build_classifier(card.arch, card.num_classes, None, card.mean, card.std, card.cifar_stem)
    _load_state(model, state, source)
    return CardedModel(model, card).eval()


def model_from_ckpt(ckpt: dict, source: str) -> CardedModel:
    """The trained network of a loaded checkpoint dict (see :func:`robust.files.load_checkpoint`)."""
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise RobustError(f"{source} is not a checkpoint of robust.module.AdversarialClassifier (no 'model.' weights)")
    return _model_from_card(card_from_checkpoint(ckpt, source), state, source)


def model_from_checkpoint(path: str | Path) -> CardedModel:
    """The trained network of a ``.ckpt`` (loaded with ``weights_only=True``), eval mode."""
    return model_from_ckpt(load_checkpoint(path), str(path))


def imagenet_model() -> CardedModel:
    """torchvision's ImageNet ResNet18 (downloaded by torchvision for online users) with its card."""
    model = build_model("resnet18", 1000, "imagenet", IMAGENET_MEAN, IMAGENET_STD)
    card = ModelCard(
        arch="resnet18", num_classes=1000, class_names=imagenet_class_names(), cifar_stem=False,
        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), image_size=224, resize=256, data="ImageNet",
        training={"attack": "none"},
    )  # fmt: skip
    return CardedModel(model, card).eval()


def model_from_export(folder: str | Path) -> CardedModel:
    """The model of an export folder (checked against its card and sha256 sums), eval mode."""
    folder = Path(folder)
    card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
    if not card_path.is_file():
        raise RobustError(f"{folder} is not an export folder (no {CARD_FILE})")
    try:
        text = card_path.read_text()
    except UnicodeDecodeError as exc:
        raise RobustError(f"{card_path} is not valid JSON ({exc})") from None
    card = ModelCard.from_json(text, str(card_path))
    if not isinstance(card.files.get(WEIGHTS_FILE), str):
        raise RobustError(f"{card_path}: 'files' has no sha256 for {WEIGHTS_FILE}")
    for name, digest in card.files.items():
        path = folder / Path(name).name
        if not path.is_file():
            raise RobustError(f"{folder} is incomplete: {name} is listed in {CARD_FILE} but missing")
        data = path.read_bytes()
        if sha256_hex(data) != digest:
            raise RobustError(f"{path} does not match the sha256 in {CARD_FILE}; the file was changed or corrupted")
        if name == WEIGHTS_FILE:
            weights = data
    try:
        state = safetensors.torch.load(weights)
    except Exception as exc:
        raise RobustError(f"{weights_path} is not a readable safetensors file ({exc})") from None
    model = _model_from_card(card, state, str(weights_path))
    for key in ("mean", "std") if isinstance(getattr(model, "normalize", None), Normalize) else ():
        if model.normalize.get_buffer(key).flatten().tolist() != torch.tensor(getattr(card, key)).tolist():
            raise RobustError(f"{weights_path} normalizes with a different {key} than {CARD_FILE} states")
    return model


def load_model(spec: str | Path) -> CardedModel:
    """Load a model for evaluation: eval mode, CPU, its :class:`~robust.card.ModelCard` in ``model.card``.

    ``spec`` is an export folder (or one of its files: ``model.json``, ``.safetensors``, ``.pt2``, ``.onnx``), a
    Lightning checkpoint (``.ckpt``, loaded with ``weights_only=True``), ``"imagenet"`` (torchvision's ImageNet
    ResNet18) or ``"hf:<model id or local dir>"`` (a Hugging Face classifier).
    """
    text = str(spec)
    if text == "imagenet":
        return imagenet_model()
    if text.startswith(HF_PREFIX):
        return build_classifier(text).eval()
    path = Path(spec)
    if path.is_dir():
        return model_from_export(path)
    if path.is_file() and path.suffix in (".json", ".safetensors", ".pt2", ".onnx"):
        return model_from_export(path.parent)
    if path.is_file():
        return model_from_checkpoint(path)
    raise RobustError(
        f"model {text!r} not found: give an export folder, a .ckpt file, 'imagenet' or 'hf:<model id or dir>'"
    )
