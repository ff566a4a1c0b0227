"""The one resolver from any model spec to a carded model: :func:`create_model` (training's initialisation, the
report, ``fool``, export) and :func:`load_model` (the same, in eval mode); :func:`spec_kind` is the one place that
tells the kinds of spec apart.

Every model is a :class:`robust.models.build.CardedModel` (input ``N×C×H×W`` in [0, 1], logits out) in eval
mode, on CPU, whose ``card`` is its :class:`robust.models.card.ModelCard`. No Lightning import: checkpoints are read as
plain dicts with ``weights_only=True``; plain state dicts (a paper's released weights) with ``weights_only=True``.

An export folder holds ``model.safetensors`` (the model's state dict, float32, keys ``normalize.mean``,
``normalize.std``, ``backbone.<torchvision key>``), ``model.json`` (the card) and optionally ``model.pt2`` (a
``torch.export`` program) and ``model.onnx``; :mod:`robust.export` writes it.
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from robust.errors import RobustError
from robust.files import load_checkpoint, sha256_hex
from robust.models.archs import ARCHS, build_arch, empty_arch, get_arch
from robust.models.build import (
    CardedModel,
    Normalize,
    build_model,
    head_of,
    imagenet_class_names,
    imagenet_state,
    imagenet_weights_file,
    load_pretrained,
    load_state,
    normalized,
    read_state_dict,
)
from robust.models.card import (
    CARD_KEY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelCard,
    TrainingRecord,
    default_normalization,
    new_card,
    training_card,
)
from robust.models.hf import HF_PREFIX, load_hf_model
from robust.threats import adaptations

WEIGHTS_FILE, CARD_FILE, PROGRAM_FILE, ONNX_FILE = "model.safetensors", "model.json", "model.pt2", "model.onnx"
# A user's own network: ``package.module:function`` (LightningCLI's class_path convention), called with no arguments.
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def create_model(
    spec: str | Path,
    *,
    num_classes: int | None = None,
    weights: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    cifar_stem: bool = False,
    channels: int | None = None,
    arch: str | None = None,
    class_names: Sequence[str] | None = None,
    image_size: int | None = None,
) -> CardedModel:
    """The one way to get a model: any spec :func:`spec_kind` tells apart, as a :class:`CardedModel` (input
    ``N×C×H×W`` in [0, 1], logits out, on CPU) whose ``card`` describes it.

    - an arch name of :data:`robust.models.archs.ARCHS`: a new network in train mode (training's initialisation,
      :func:`new_model`) with ``num_classes`` outputs, ``channels`` input channels (default the arch's), the
      normalization ``mean`` / ``std`` (default :func:`~robust.models.card.default_normalization`), ``cifar_stem``
      and initial ``weights``.
    - ``"hf:<model id or dir>"``: a Hugging Face classifier in train mode, its head replaced when ``num_classes``
      differs (:func:`robust.models.hf.load_hf_model`).
    - a ``.ckpt``, an export folder (or one of its files), ``"imagenet"``: a trained model in eval mode with the
      card it carries (no other argument: it describes itself).
    - a state dict file with ``arch``, or a factory ``package.module:function`` (``weights`` optional): a network
      trained elsewhere, in eval mode (:func:`external_model`; ``mean``, ``std``, ``class_names``, ``image_size``
      describe it).
    """
    kind = spec_kind(spec, arch=arch)
    if kind == "arch":
        return new_model(str(spec), num_classes, weights, mean, std, cifar_stem, channels)
    if kind == "hf":
        if weights is not None:
            raise RobustError(f"weights are for the archs of robust.models.archs; {spec} loads its own weights")
        model = load_hf_model(str(spec).removeprefix(HF_PREFIX), num_classes).train()
        model.card.training.init = init_record(str(spec), "hf", None, None, None)
        return model
    described = {"arch": arch, "weights": weights, "mean": mean, "std": std, "class_names": class_names}
    if kind in ("state_dict", "factory"):
        return external_model(str(spec), kind, **described, image_size=image_size)
    given = {**described, "num_classes": num_classes, "image_size": image_size, "channels": channels}
    given = sorted(k for k, v in {**given, "cifar_stem": cifar_stem or None}.items() if v is not None)
    if given:
        raise RobustError(
            f"{', '.join(given)} describe a new network, a plain state dict or a factory's network; {spec} is a "
            f"{kind} and carries its own description"
        )
    if kind == "imagenet":
        return imagenet_model()
    if kind == "export":
        return model_from_export(export_folder(spec))
    return model_from_checkpoint(spec)


def load_model(spec: str | Path, **description) -> CardedModel:
    """Load a model for evaluation: :func:`create_model` in eval mode (``description``: its keyword arguments, which
    a state dict's or a factory's network needs: ``arch``, ``weights``, ``mean``, ``std``, ``class_names``,
    ``image_size``)."""
    return create_model(spec, **description).eval()


def new_model(
    arch: str,
    num_classes: int | None,
    weights: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    cifar_stem: bool = False,
    channels: int | None = None,
) -> CardedModel:
    """A new network of ``arch`` in train mode, its card's ``training.init`` the record of its initial ``weights``
    (:func:`init_record`): ``None`` (random), ``"imagenet"`` (torchvision's, downloaded to its hub cache), a state
    dict file of that arch (a torchvision ``.pth``, a paper's released weights), one of our ``.ckpt`` files or an
    export folder (or one of its files), all read safely (``weights_only=True``, safetensors). Checkpoints and
    exports must hold the same arch, channels and normalization; the head is new when their class count differs,
    ``conv1`` when ``cifar_stem`` is asked of weights made for torchvision's stem."""
    if num_classes is None:
        raise RobustError(f"arch {arch!r} needs num_classes")
    info = get_arch(arch)
    channels = channels or info.channels
    default_mean, default_std = default_normalization(channels)
    mean, std = tuple(mean or default_mean), tuple(std or default_std)
    backbone = build_arch(arch, num_classes, channels, cifar_stem)
    if weights is None:
        record = init_record(None, "scratch", None, None, [])
    else:
        kind, state, digest = _pretrained_state(str(weights), arch, mean, std)
        fresh = load_pretrained(backbone, arch, state, str(weights))
        record = init_record(str(weights), kind, digest, int(state[f"{info.head}.weight"].shape[0]), fresh)
    card = new_card(
        arch,
        num_classes,
        image_size=info.image_size,
        channels=channels,
        mean=mean,
        std=std,
        cifar_stem=cifar_stem,
        training=TrainingRecord(init=record),
    )
    return CardedModel(normalized(backbone, mean, std), card)


def initialize_classifier(arch: str, num_classes: int | None = None, weights: str | None = None, *args, **kwargs):
    """Deprecated: :func:`create_model`, whose card's ``training.init`` is the init record returned here."""
    warnings.warn("initialize_classifier is now robust.models.resolve.create_model", FutureWarning, stacklevel=2)
    names = ("mean", "std", "cifar_stem", "channels")
    model = create_model(
        arch, num_classes=num_classes, weights=weights, **dict(zip(names, args, strict=False)), **kwargs
    )
    return model, model.card.training.init


def build_classifier(*args, **kwargs) -> CardedModel:
    """Deprecated: :func:`create_model`."""
    warnings.warn("build_classifier is now robust.models.resolve.create_model", FutureWarning, stacklevel=2)
    names = ("num_classes", "weights", "mean", "std", "cifar_stem", "channels")
    return create_model(args[0], **dict(zip(names, args[1:], strict=False)), **kwargs)


def init_record(weights: str | None, kind: str, digest: str | None, classes: int | None, fresh: list | None) -> dict:
    """Where a new network's weights came from (the card's ``training.init``): ``weights`` (as given, or the hf
    arch), ``kind`` (``scratch``, ``imagenet``, ``state_dict``, ``checkpoint``, ``export``, ``hf``), ``sha256`` of
    the weights file (null for scratch and hf), ``classes`` (the weights' class count; null for scratch and hf) and
    ``fresh`` (the layers the weights did not initialise, e.g. ``["fc"]``; null for hf, whose loader reports new
    weights itself)."""
    return {
        "weights": weights,
        "kind": kind,
        "sha256": digest,
        "classes": classes,
        "fresh": None if fresh is None else list(fresh),
    }


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
        adapted=adaptations(int(hp.get("num_classes", 10))),
    )


def _model_from_card(card: ModelCard, state: dict[str, Tensor], source: str) -> CardedModel:
    """The network ``card`` describes, holding ``state``, eval mode."""
    if card.arch.startswith(HF_PREFIX):
        model = load_hf_model(card.arch.removeprefix(HF_PREFIX), card.num_classes)
    else:
        backbone = empty_arch(card.arch, card.num_classes, card.channels, card.cifar_stem)  # load_state fills it all
        model = normalized(backbone, card.mean, card.std)
    load_state(model, state, source, "its model description")
    return CardedModel(model, card).eval()


def model_from_ckpt(ckpt: dict, source: str) -> CardedModel:
    """The trained network of a loaded checkpoint dict (see :func:`robust.files.load_checkpoint`)."""
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise RobustError(
            f"{source} is not a checkpoint of robust.training.module.AdversarialClassifier (no 'model.' weights)"
        )
    return _model_from_card(card_from_checkpoint(ckpt, source), state, source)


def model_from_checkpoint(path: str | Path) -> CardedModel:
    """The trained network of a ``.ckpt`` (loaded with ``weights_only=True``), eval mode."""
    return model_from_ckpt(load_checkpoint(path), str(path))


def imagenet_model() -> CardedModel:
    """torchvision's ImageNet ResNet18 (downloaded by torchvision for online users) with its card."""
    model = build_model("resnet18", 1000, "imagenet", IMAGENET_MEAN, IMAGENET_STD)
    card = new_card(
        "resnet18",
        1000,
        image_size=224,
        class_names=imagenet_class_names(),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
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

    ``"arch"``: a name of :data:`robust.models.archs.ARCHS` (a new network); ``"imagenet"``: torchvision's
    ImageNet weights; ``"hf"``: ``hf:<model id or dir>``; ``"export"``: an export
    folder or one of its files (``model.json``, ``.safetensors``, ``.pt2``, ``.onnx``); ``"checkpoint"``: a
    ``.ckpt`` (or, with no ``arch`` given, any other file: read as a Lightning checkpoint); ``"state_dict"``: a
    file holding a plain state dict of ``arch``; ``"factory"``: ``package.module:function`` building a network.
    Anything else is a one-line RobustError naming the accepted kinds."""
    text = str(spec)
    if text in ARCHS:
        return "arch"
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
        backbone = empty_arch(arch, num_classes, channels, cifar_stem)
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
    # A network trained elsewhere normalizes nothing unless told: its own first layer sees the [0, 1] pixels.
    mean = [0.0] * channels if mean is None else [float(m) for m in mean]
    std = [1.0] * channels if std is None else [float(s) for s in std]
    card = new_card(
        arch,
        num_classes,
        image_size=size,
        channels=channels,
        class_names=class_names,
        mean=mean,
        std=std,
        cifar_stem=cifar_stem,
        training=TrainingRecord(init=init_record(weights or spec, kind, digest, num_classes, [])),
    )
    return CardedModel(normalized(backbone, mean, std), card).eval()
