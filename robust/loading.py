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
from robust.models import (
    HEAD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    STEM,
    CardedModel,
    Normalize,
    build_backbone,
    build_model,
    imagenet_class_names,
    imagenet_state,
    imagenet_weights_file,
    load_state,
    normalized,
    read_torchvision_file,
)

WEIGHTS_FILE, CARD_FILE, PROGRAM_FILE, ONNX_FILE = "model.safetensors", "model.json", "model.pt2", "model.onnx"
CARD_KEY = "robust_card"  # where a checkpoint keeps its card (a dict, ModelCard.to_dict())
TRAINING_KEYS = ("attack", "switched_from", "target", "eps", "alpha", "adv_ratio", "attack_steps", "nfgsm_noise",
                 "objective", "beta", "ema_decay", "init")  # fmt: skip


def initialize_classifier(
    arch: str,
    num_classes: int | None = None,
    weights: str | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    cifar_stem: bool = False,
) -> tuple[nn.Sequential, dict]:
    """A new classifier in train mode and its init record (where its weights came from).

    A torchvision ``arch`` is :func:`robust.models.build_model` with ``weights``: ``None`` (random init),
    ``"imagenet"`` (torchvision's, downloaded to its hub cache), a torchvision-format state dict file (``.pth``),
    one of our Lightning checkpoints (``.ckpt``) or an export folder (or its ``model.json`` / ``model.safetensors``);
    all read safely (``weights_only=True``, safetensors). Checkpoints and exports must hold the same ``arch`` and
    normalization (``mean``, ``std``); the head (``fc``) is new when their class count differs from
    ``num_classes``, ``conv1`` when ``cifar_stem`` is asked of weights made for torchvision's stem.
    ``"hf:<model id or dir>"`` is a Hugging Face classifier with its own weights and preprocessing
    (:func:`robust.hf.load_hf_model`; head replaced when ``num_classes`` differs; ``weights``, ``mean``, ``std``,
    ``cifar_stem`` unused).

    The init record (kept in the card's ``training["init"]``): ``weights`` (as given, or the hf arch), ``kind``
    (``scratch``, ``imagenet``, ``torchvision``, ``checkpoint``, ``export`` or ``hf``), ``sha256`` (of the weights
    file: the ``.pth``, the ``.ckpt``, the export's ``model.safetensors``, torchvision's cached ImageNet file; null
    otherwise), ``classes`` (the weights' class count; null for scratch and hf) and ``fresh`` (the layers the weights
    did not initialise, e.g. ``["fc"]``; null for hf, whose loader reports new weights itself).
    """
    if arch.startswith(HF_PREFIX):
        if weights is not None:
            raise RobustError(f"weights are for torchvision archs; {arch} loads its own pretrained weights")
        model = load_hf_model(arch.removeprefix(HF_PREFIX), num_classes).train()
        return model, {"weights": arch, "kind": "hf", "sha256": None, "classes": None, "fresh": None}
    if num_classes is None:
        raise RobustError(f"arch {arch!r} needs num_classes")
    if weights is None:
        model = build_model(arch, num_classes, None, mean, std, cifar_stem)
        return model, _init_record(None, "scratch", None, None, [])
    kind, state, digest = _pretrained_state(str(weights), arch, mean, std)
    backbone, fresh = build_backbone(arch, num_classes, state, cifar_stem)
    classes = int(state[f"{HEAD}.weight"].shape[0])
    return normalized(backbone, mean, std), _init_record(str(weights), kind, digest, classes, fresh)


def build_classifier(*args, **kwargs) -> nn.Sequential:
    """:func:`initialize_classifier`'s model (same arguments), without its init record."""
    return initialize_classifier(*args, **kwargs)[0]


def _init_record(weights: str | None, kind: str, digest: str | None, classes: int | None, fresh: list) -> dict:
    return {"weights": weights, "kind": kind, "sha256": digest, "classes": classes, "fresh": list(fresh)}


def describe_init(init: Mapping, num_classes: int) -> str:
    """One line for the log: where a new classifier's weights came from and which layers are new."""
    if init["kind"] in ("scratch", "hf"):
        return f"initial weights: {init['weights'] or 'random'} ({init['kind']})"
    digest = f", sha256 {init['sha256'][:12]}…" if init["sha256"] else ""
    new = {HEAD: f"a new {num_classes}-class head ({HEAD}; the weights have {init['classes']} classes)",
           STEM: f"a new CIFAR stem ({STEM}; the weights have torchvision's 7×7 one)"}  # fmt: skip
    fresh = "; ".join(new[layer] for layer in init["fresh"]) or "every layer loaded"
    return f"initial weights: {init['weights']} ({init['kind']}{digest}): {fresh}"


def _pretrained_state(
    weights: str, arch: str, mean: Sequence[float], std: Sequence[float]
) -> tuple[str, dict[str, Tensor], str | None]:
    """(kind, torchvision-format backbone state dict, sha256 of the weights file) for a ``weights`` spec."""
    if weights == "imagenet":
        state = imagenet_state(arch)
        file = imagenet_weights_file(arch)
        return "imagenet", state, sha256_hex(file.read_bytes()) if file.is_file() else None
    path = Path(weights)
    if path.is_dir() or (path.is_file() and path.suffix in (".json", ".safetensors", ".pt2")):
        model = model_from_export(path if path.is_dir() else path.parent)
        kind, digest = "export", model.card.files[WEIGHTS_FILE]
    elif path.is_file() and path.suffix == ".ckpt":
        model = model_from_checkpoint(path)
        kind, digest = "checkpoint", sha256_hex(path.read_bytes())
    elif path.is_file():
        return "torchvision", read_torchvision_file(path), sha256_hex(path.read_bytes())
    else:
        raise RobustError(f"weights {weights!r} not found: give a torchvision .pth file, a .ckpt, an export folder "
                          "or 'imagenet'")  # fmt: skip
    card = model.card
    if card.arch != arch:
        raise RobustError(f"{weights} holds a {card.arch}, not a {arch}: set arch {card.arch}")
    for key, theirs, ours in (("mean", card.mean, mean), ("std", card.std, std)):
        if not torch.allclose(torch.tensor(theirs, dtype=torch.float64), torch.tensor(ours, dtype=torch.float64)):
            raise RobustError(f"{weights} was trained with normalization {key} {theirs}, not {list(ours)}: set "
                              f"{key} to its values")  # fmt: skip
    prefix = "backbone."
    return kind, {k.removeprefix(prefix): v for k, v in model.state_dict().items() if k.startswith(prefix)}, digest


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


def _model_from_card(card: ModelCard, state: dict[str, Tensor], source: str) -> CardedModel:
    """The network ``card`` describes, holding ``state``, eval mode."""
    model = build_classifier(card.arch, card.num_classes, None, card.mean, card.std, card.cifar_stem)
    load_state(model, state, source, "its model description")
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
