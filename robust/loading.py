"""Load models: ``load_model(spec)`` for evaluation, ``initialize_classifier`` for training; :func:`spec_kind` is
the one place that tells the kinds of model spec apart (both use it).

Every loaded model is a :class:`robust.models.CardedModel` (input ``N×C×H×W`` in [0, 1], logits out) in eval
mode, on CPU, whose ``card`` is its :class:`robust.card.ModelCard`. No Lightning import: checkpoints are read as
plain dicts with ``weights_only=True``; plain state dicts (a paper's released weights) with ``weights_only=True``.

An export folder holds ``model.safetensors`` (the model's state dict, float32, keys ``normalize.mean``,
``normalize.std``, ``backbone.<torchvision key>``), ``model.json`` (the card) and optionally ``model.pt2`` (a
``torch.export`` program) and ``model.onnx``; :mod:`robust.export` writes it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from robust.archs import build_arch, get_arch
from robust.card import ModelCard, RobustnessRecord, TrainingRecord
from robust.errors import RobustError
from robust.files import load_checkpoint, sha256_hex
from robust.hf import HF_PREFIX, load_hf_model
from robust.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CardedModel,
    Normalize,
    build_backbone,
    build_model,
    default_normalization,
    head_of,
    imagenet_class_names,
    imagenet_state,
    imagenet_weights_file,
    load_pretrained,
    load_state,
    normalized,
    read_state_dict,
)
from robust.threats import adaptations

WEIGHTS_FILE, CARD_FILE, PROGRAM_FILE, ONNX_FILE = "model.safetensors", "model.json", "model.pt2", "model.onnx"
CARD_KEY = "robust_card"  # where a checkpoint keeps its card (a dict, ModelCard.to_dict())
# A user's own network: ``package.module:function`` (LightningCLI's class_path convention), called with no arguments.
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def initialize_classifier(
    arch: str,
    num_classes: int | None = None,
    weights: str | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    cifar_stem: bool = False,
    channels: int | None = None,
) -> tuple[nn.Sequential, dict]:
    """A new classifier in train mode and its init record (where its weights came from).

    An ``arch`` of :data:`robust.archs.ARCHS` is :func:`robust.models.build_model` (``channels`` input channels,
    default the arch's) with ``weights`` (any spec :func:`spec_kind` tells apart but hf): ``None`` (random init),
    ``"imagenet"`` (torchvision's, downloaded to its hub cache), a state dict file of that arch (a torchvision
    ``.pth``, a paper's released weights), one of our Lightning checkpoints (``.ckpt``) or an export folder (or its
    ``model.json`` / ``model.safetensors``); all read safely (``weights_only=True``, safetensors). Checkpoints and
    exports must hold the same ``arch``, channels and normalization (``mean``, ``std``); the head is new when their
    class count differs from ``num_classes``, ``conv1`` when ``cifar_stem`` is asked of weights made for
    torchvision's stem. ``"hf:<model id or dir>"`` is a Hugging Face classifier with its own weights and
    preprocessing (:func:`robust.hf.load_hf_model`; head replaced when ``num_classes`` differs; ``weights``,
    ``mean``, ``std``, ``cifar_stem`` unused).

    The init record (kept in the card's ``training.init``): ``weights`` (as given, or the hf arch), ``kind``
    (``scratch``, ``imagenet``, ``state_dict``, ``checkpoint``, ``export`` or ``hf``), ``sha256`` (of the weights
    file: the state dict file, the ``.ckpt``, the export's ``model.safetensors``, torchvision's cached ImageNet
    file; null otherwise), ``classes`` (the weights' class count; null for scratch and hf) and ``fresh`` (the layers
    the weights did not initialise, e.g. ``["fc"]``; null for hf, whose loader reports new weights itself).
    """
    if arch.startswith(HF_PREFIX):
        if weights is not None:
            raise RobustError(f"weights are for the archs of robust.archs; {arch} loads its own pretrained weights")
        model = load_hf_model(arch.removeprefix(HF_PREFIX), num_classes).train()
        return model, {"weights": arch, "kind": "hf", "sha256": None, "classes": None, "fresh": None}
    if num_classes is None:
        raise RobustError(f"arch {arch!r} needs num_classes")
    if weights is None:
        model = build_model(arch, num_classes, None, mean, std, cifar_stem, channels)
        return model, _init_record(None, "scratch", None, None, [])
    kind, state, digest = _pretrained_state(str(weights), arch, mean, std)
    backbone = build_arch(arch, num_classes, channels, cifar_stem)
    fresh = load_pretrained(backbone, arch, state, str(weights))
    classes = int(state[f"{get_arch(arch).head}.weight"].shape[0])
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
    fresh = (
        "; ".join(
            f"a new CIFAR stem ({layer}; the weights have torchvision's 7×7 one)"
            if layer == "conv1"
            else f"a new {num_classes}-class head ({layer}; the weights have {init['classes']} classes)"
            for layer in init["fresh"]
        )
        or "every layer loaded"
    )
    return f"initial weights: {init['weights']} ({init['kind']}{digest}): {fresh}"


def _pretrained_state(
    weights: str, arch: str, mean: Sequence[float], std: Sequence[float]
) -> tuple[str, dict[str, Tensor], str | None]:
    """(kind, torchvision-format backbone state dict, sha256 of the weights file) for a ``weights`` spec."""
    kind = spec_kind(weights, arch=arch)
    if kind == "imagenet":
        state = imagenet_state(arch)
        file = imagenet_weights_file(arch)
        return "imagenet", state, sha256_hex(file.read_bytes()) if file.is_file() else None
    if kind == "state_dict":
        return kind, read_state_dict(weights), sha256_hex(Path(weights).read_bytes())
    if kind == "export":
        model = model_from_export(export_folder(weights))
        digest = model.card.files[WEIGHTS_FILE]
    elif kind == "checkpoint":
        model = model_from_checkpoint(weights)
        digest = sha256_hex(Path(weights).read_bytes())
    else:
        raise RobustError(f"weights {weights!r} must be a state dict file, a .ckpt, an export folder or 'imagenet'")
    card = model.card
    if card.arch != arch:
        raise RobustError(f"{weights} holds a {card.arch}, not a {arch}: set arch {card.arch}")
    for key, theirs, ours in (("mean", card.mean, mean), ("std", card.std, std)):
        same = len(theirs) == len(ours) and torch.allclose(
            torch.tensor(theirs, dtype=torch.float64), torch.tensor(ours, dtype=torch.float64)
        )
        if not same:
            raise RobustError(
                f"{weights} was trained with normalization {key} {theirs}, not {list(ours)}: set {key} to its values"
            )
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
    channels = int(hp.get("channels") or data.get("channels") or 3)
    default_mean, default_std = default_normalization(channels)
    names = hp.get("class_names") or data.get("class_names") or [str(i) for i in range(num_classes)]
    robustness = RobustnessRecord(
        metrics={k.removeprefix("val/"): float(v) for k, v in metrics.items() if k.startswith("val/")},
        norm=hp.get("norm", "linf"),
        eps=hp.get("eps") if hp.get("val_eps") is None else hp["val_eps"],
        steps=hp.get("val_steps"),
        jpeg_quality=hp.get("jpeg_quality"),
        adapted=adaptations(num_classes),  # validation's threats at this class count
        best=best,
        epoch=epoch,
        global_step=global_step,
    )
    return ModelCard(
        arch=hp.get("arch", "resnet18"),
        num_classes=num_classes,
        class_names=[str(n) for n in names],
        image_size=size,
        resize=int(data.get("resize") or size),
        channels=channels,
        mean=[float(m) for m in hp.get("mean") or default_mean],
        std=[float(s) for s in hp.get("std") or default_std],
        cifar_stem=bool(hp.get("cifar_stem", False)),
        data=data.get("name"),
        training=TrainingRecord.from_values(hp, alpha=alpha),
        robustness=robustness,
    )


def card_from_checkpoint(ckpt: dict, source: str) -> ModelCard:
    """The card a checkpoint stores; for checkpoints written before cards were stored, the one its
    hyper-parameters describe (training alpha as configured, no best score)."""
    if CARD_KEY in ckpt:
        return ModelCard.from_dict(ckpt[CARD_KEY], f"the model card in {source}")
    hp = dict(ckpt.get("hyper_parameters") or {})
    return training_card(
        hp,
        ckpt.get("robust_data"),
        ckpt.get("robust_metrics") or {},
        alpha=hp.get("alpha"),
        best=None,
        epoch=ckpt.get("epoch"),
        global_step=ckpt.get("global_step"),
    )


def _model_from_card(card: ModelCard, state: dict[str, Tensor], source: str) -> CardedModel:
    """The network ``card`` describes, holding ``state``, eval mode."""
    model = build_classifier(card.arch, card.num_classes, None, card.mean, card.std, card.cifar_stem, card.channels)
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
        arch="resnet18",
        num_classes=1000,
        class_names=imagenet_class_names(),
        cifar_stem=False,
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        image_size=224,
        resize=256,
        data="ImageNet",
        training=TrainingRecord(attack="none"),
    )
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


def spec_kind(spec: str | Path, arch: str | None = None) -> str:
    """What kind of model ``spec`` names; the one place model specs are told apart.

    ``"imagenet"``: torchvision's ImageNet weights; ``"hf"``: ``hf:<model id or dir>``; ``"export"``: an export
    folder or one of its files (``model.json``, ``.safetensors``, ``.pt2``, ``.onnx``); ``"checkpoint"``: a
    ``.ckpt`` (or, with no ``arch`` given, any other file: read as a Lightning checkpoint); ``"state_dict"``: a
    file holding a plain state dict of ``arch``; ``"factory"``: ``package.module:function`` building a network.
    Anything else is a one-line RobustError naming the accepted kinds."""
    text = str(spec)
    if text == "imagenet":
        return "imagenet"
    if text.startswith(HF_PREFIX):
        return "hf"
    path = Path(text)
    if path.is_dir() or (path.is_file() and path.suffix in (".json", ".safetensors", ".pt2", ".onnx")):
        return "export"
    if path.is_file():
        return "checkpoint" if path.suffix == ".ckpt" or arch is None else "state_dict"
    if FACTORY.match(text):
        return "factory"
    raise RobustError(
        f"model {text!r} not found: give an export folder, a .ckpt file, a state dict file with its arch, "
        "'imagenet', 'hf:<model id or dir>' or a factory 'package.module:function'"
    )


def export_folder(spec: str | Path) -> Path:
    """The export folder ``spec`` names (the folder itself or one of its files)."""
    path = Path(spec)
    return path if path.is_dir() else path.parent


def call_factory(spec: str) -> nn.Module:
    """The network ``package.module:function`` builds (called with no arguments)."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RobustError(f"cannot import {module_name!r} for the model factory {spec!r} ({exc})") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise RobustError(f"{module_name} has no function {name!r} (model factory {spec!r})")
    net = factory()
    if not isinstance(net, nn.Module):
        raise RobustError(f"the model factory {spec!r} returned a {type(net).__name__}, not a torch.nn.Module")
    return net


def external_model(
    spec: str,
    kind: str,
    arch: str | None = None,
    weights: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    image_size: int | None = None,
) -> CardedModel:
    """A network trained elsewhere, as a :class:`CardedModel` our report and ``fool`` take like our own.

    ``kind`` ``"state_dict"``: ``spec`` is a state dict file of ``arch`` (e.g. Wong et al.'s ``fgsm.pth`` with
    ``mnist_net``); its channel count, class count and (for torchvision ResNets) CIFAR stem are read off the
    weights. ``kind`` ``"factory"``: ``spec`` is ``package.module:function`` and ``weights`` an optional state dict
    file for what it returns. Both load with ``weights_only=True`` and must fit exactly. ``mean``/``std`` (per
    channel, [0, 1] pixel units) are the normalization the network expects in front of it: default none (mean 0,
    std 1: it takes [0, 1] images as they are, the papers' convention). ``class_names`` default ``"0"``, ``"1"``, …;
    ``image_size`` defaults to the arch's natural size (32 for a factory)."""
    if kind == "state_dict":
        if arch is None:
            raise RobustError(f"{spec} is a plain state dict: give its architecture (--arch)")
        state = read_state_dict(spec)
        info = get_arch(arch)
        stem = state.get(f"{info.stem}.weight")
        channels = int(stem.shape[1]) if stem is not None and stem.dim() == 4 else info.channels
        cifar_stem = info.torchvision and stem is not None and stem.shape[-1] == 3
        head = state.get(f"{info.head}.weight")
        num_classes = int(head.shape[0]) if head is not None else 10
        backbone = build_backbone(arch, num_classes, None, cifar_stem, channels)[0]
        load_state(backbone, state, spec, f"a {arch}")
        digest, size = sha256_hex(Path(spec).read_bytes()), image_size or info.image_size
    else:
        backbone, arch, cifar_stem = call_factory(spec), spec, False
        if weights is not None:
            load_state(backbone, read_state_dict(weights), weights, f"the network {spec} builds")
        first_conv = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first_conv.in_channels if first_conv is not None else 3
        num_classes = head_of(backbone).out_features
        digest, size = None if weights is None else sha256_hex(Path(weights).read_bytes()), image_size or 32
    mean = [0.0] * channels if mean is None else [float(m) for m in mean]
    std = [1.0] * channels if std is None else [float(s) for s in std]
    names = [str(n) for n in class_names] if class_names else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise RobustError(f"{len(names)} class names given for a model with {num_classes} outputs")
    card = ModelCard(
        arch=arch,
        num_classes=num_classes,
        class_names=names,
        image_size=int(size),
        resize=int(size),
        channels=channels,
        mean=mean,
        std=std,
        cifar_stem=bool(cifar_stem),
        data=None,
        training=TrainingRecord(init=_init_record(weights or spec, kind, digest, num_classes, [])),
    )
    return CardedModel(normalized(backbone, mean, std), card).eval()


def load_model(spec: str | Path, **external) -> CardedModel:
    """Load a model for evaluation: eval mode, CPU, its :class:`~robust.card.ModelCard` in ``model.card``.

    ``spec`` is any kind :func:`spec_kind` tells apart: an export folder (or one of its files), a Lightning
    checkpoint (``.ckpt``, loaded with ``weights_only=True``), ``"imagenet"`` (torchvision's ImageNet ResNet18),
    ``"hf:<model id or local dir>"`` (a Hugging Face classifier), a state dict file with ``arch=...``, or a factory
    ``package.module:function`` (``weights=...`` optional). ``external`` (``arch``, ``weights``, ``mean``, ``std``,
    ``class_names``, ``image_size``) describes a state dict's or a factory's network (:func:`external_model`);
    the other kinds carry their own description and take none of it.
    """
    kind = spec_kind(spec, arch=external.get("arch"))
    if kind in ("state_dict", "factory"):
        return external_model(str(spec), kind, **external)
    given = sorted(k for k, v in external.items() if v is not None)
    if given:
        raise RobustError(
            f"{', '.join(given)} describe a plain state dict or a factory's network; {spec} is a "
            f"{kind} and carries its own description"
        )
    if kind == "imagenet":
        return imagenet_model()
    if kind == "hf":
        return build_classifier(str(spec)).eval()
    if kind == "export":
        return model_from_export(export_folder(spec))
    return model_from_checkpoint(spec)
