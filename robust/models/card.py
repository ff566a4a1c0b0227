"""The model card: what a trained model is and how to feed it, in one schema.

:class:`ModelCard` is stored in checkpoints (:func:`robust.training.run_record.save`), written as an export's
``model.json``, built for ImageNet and Hugging Face models, and carried by every model :func:`robust.load_model`
returns. Its fields, their types and their meanings are the dataclasses below, all the way down (how the model was
trained: :class:`TrainingRecord`; what validation measured: :class:`RobustnessRecord`); :meth:`ModelCard.from_dict`
checks a parsed card against those same annotations, so there is no second schema to keep in step.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any

from robust.errors import RobustError

FORMAT = "robust-export"
FORMAT_VERSION = 1
CARD_KEY = "robust_card"  # where a checkpoint keeps its card (a dict, ModelCard.to_dict())

# The normalization inside a model when none is given ([0, 1] pixel units per channel): part of what a card states.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def default_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` when none is given: ImageNet's for RGB, none (0, 1) for grayscale."""
    return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.0,) * channels, (1.0,) * channels)


def _doc(text: str, **kwargs: Any) -> Any:
    return field(metadata={"doc": text}, **kwargs)


def _unset(text: str) -> Any:
    """A record's field that older cards and models trained elsewhere may lack: null then."""
    return _doc(text, default=None)


class _Record:
    """What the card's dataclasses share: JSON-native values only (lists, not tuples), so ``to_dict`` is what is
    written, fields in file order."""

    @classmethod
    def schema(cls) -> dict[str, tuple[str, str]]:
        """``{field: (type, meaning)}`` in file order, for documentation."""
        hints = typing.get_type_hints(cls)
        return {f.name: (_type_name(hints[f.name]), f.metadata["doc"]) for f in fields(cls)}

    def to_dict(self) -> dict:
        """The record as JSON-native values (a deep copy), fields in file order."""
        return asdict(self)


@dataclass(kw_only=True)
class TrainingRecord(_Record):
    """How the model was trained (``ModelCard.training``): the settings in force when it was saved, one field each
    (a new setting is one line here; :func:`training_card` fills every field from the module's
    hyper-parameters). Null: unknown (a card written before the field existed, a network trained elsewhere) or not
    applicable. eps and alpha are in [0, 1] pixel units."""

    attack: str | None = _unset(
        "training attack in force when saved (the overfitting guard may have switched fgsm_rs to nfgsm); 'none': "
        "clean training"
    )
    switched_from: str | None = _unset("the configured attack when the guard switched away from it, else null")
    target: str | None = _unset("target class of the training attack: none (untargeted), random or least_likely")
    norm: str | None = _unset("threat model of the training attack: linf or l2")
    eps: float | None = _unset("budget of the training attack, pixel units of its norm")
    alpha: float | None = _unset("step in force when saved, after any guard rollback (null: no attack)")
    adv_ratio: float | None = _unset("fraction of each batch made adversarial, in [0, 1]")
    attack_steps: int | None = _unset("PGD training steps")
    attack_early_exit: bool | None = _unset("PGD training froze each example at its first misclassified iterate")
    nfgsm_noise: float | None = _unset("N-FGSM's noise, uniform in ±nfgsm_noise·eps")
    clamp_start: bool | None = _unset("whether fgsm_rs's random start was clipped to [0, 1] before its gradient")
    objective: str | None = _unset("training loss: ce, trades or mart")
    beta: float | None = _unset("TRADES / MART trade-off weight")
    ema_decay: float | None = _unset(
        "the weights are an exponential moving average of the trained ones with this decay; null: the trained weights"
    )
    init: dict | None = _unset(
        "where the initial weights came from: {weights, kind, sha256, classes, fresh} "
        "(robust.models.resolve.init_record)"
    )
    seed: int | None = _unset("the run's global seed (seed_everything); null: unseeded")
    guard: dict | None = _unset(
        "the overfitting guard: {action, probe, thresholds, best_pgd, collapses: [{epoch, step, signature, pgd, fgsm, "
        "action}], rollbacks} (robust.training.guard); null: not watching"
    )
    optimizer: dict | None = _unset("the optimizer in force: {class, <its defaults>}")
    lr_scheduler: dict | None = _unset(
        "the learning-rate schedule in force: {class, <the arguments it was built with>}; null: none"
    )

    @classmethod
    def from_values(cls, values: Mapping, **override: Any) -> TrainingRecord:
        """The record of ``values`` (a mapping holding its fields among others, e.g. a module's hyper-parameters;
        missing ones null), with ``override`` in place of those fields."""
        return cls(**{f.name: values.get(f.name) for f in fields(cls)} | override)


@dataclass(kw_only=True)
class RobustnessRecord(_Record):
    """What validation measured when the model was saved (``ModelCard.robustness``); null fields and no metrics for
    a model not trained here."""

    metrics: dict = _doc("latest val/* figures by threat key (accuracies in [0, 1]) and loss", default_factory=dict)
    norm: str | None = _unset("threat model of validation: linf or l2 (its metrics are logged as val/l2/<key>)")
    eps: float | None = _unset("validation eps, pixel units of its norm")
    steps: int | None = _unset("validation PGD steps")
    jpeg_quality: int | None = _unset("JPEG defense quality of validation")
    adapted: dict | None = _unset(
        "how validation's APGD parts departed from AutoAttack's at the model's class count, {key: {runs, note}} "
        "(robust.threats.ThreatSpec.adaptations; empty at 4 classes or more)"
    )
    not_learned: str | None = _unset(
        "why the saved model has not learned (robust.learned.not_learned: clean accuracy within 10 points of chance, "
        "or one class for nearly every image), or null when it has or nothing was validated"
    )
    best: dict | None = _unset("{monitor, score} of the checkpoint callback, or null")
    epoch: int | None = _unset("epoch when saved")
    global_step: int | None = _unset("optimizer steps when saved")


@dataclass(kw_only=True)
class ModelCard(_Record):
    """A model's description (JSON-native values, see :class:`_Record`)."""

    format: str = _doc(f"always {FORMAT!r}", default=FORMAT)
    format_version: int = _doc(f"{FORMAT_VERSION}; readers refuse other versions", default=FORMAT_VERSION)
    arch: str = _doc(
        "backbone: a name of robust.models.archs.ARCHS (resnet18, mnist_net, preact_resnet18, ...), "
        "hf:<model id or dir>, or the factory <package.module:function> that builds it"
    )
    num_classes: int = _doc("number of output logits")
    class_names: list[str] = _doc("name of each output, num_classes entries")
    image_size: int = _doc("input height and width in pixels (center crop)")
    channels: int = _doc("input channels: 3 (RGB) or 1 (grayscale)", default=3)
    resize: int = _doc("short side to resize images to before the center crop")
    mean: list[float] = _doc("per-channel mean of the built-in normalization (channels values, [0, 1] pixel units)")
    std: list[float] = _doc("per-channel std of the built-in normalization (channels values, [0, 1] pixel units)")
    cifar_stem: bool = _doc("3×3 stride-1 conv1 and no max-pool (32×32 inputs) instead of torchvision's stem")
    data: str | None = _doc("training data module name, e.g. Digits, CIFAR10, ImageFolder")
    training: TrainingRecord = _doc("how the model was trained (TrainingRecord.schema())")
    robustness: RobustnessRecord = _doc(
        "what validation measured when it was saved (RobustnessRecord.schema())", default_factory=RobustnessRecord
    )
    versions: dict = _doc(
        "library versions at export: python, torch, torchvision, lightning, safetensors, robust (+ onnx, onnxscript, "
        "onnxruntime with an ONNX export)",
        default_factory=dict,
    )
    created: str | None = _doc("export time, ISO 8601 UTC (null until exported)", default=None)
    files: dict = _doc("sha256 (hex) of each file of an export (model.safetensors always)", default_factory=dict)
    onnx: dict | None = _doc(
        "the export's model.onnx (null without one): opset, input and output (tensor names), input_shape "
        "(['batch', C, S, S], float32 in [0, 1], normalization inside), check (the onnxruntime run against torch at "
        "export: provider, data, max_abs_logit_diff, tolerance)",
        default=None,
    )

    def to_json(self) -> str:
        """``model.json`` text: indented JSON and a final newline."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: object, source: str) -> ModelCard:
        """Check ``data`` (a parsed card from ``source``, named in errors) against the fields' types, the records'
        fields' types and the card's own consistency; RobustError with one sentence for the first problem. A field
        with a default may be absent (cards written before the field existed); it then takes the default."""
        if not isinstance(data, dict):
            raise RobustError(f"{source} must hold a JSON object")
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise RobustError(
                f"{source} is format {data.get('format')!r} version {data.get('format_version')}; "
                f"this library reads {FORMAT!r} version {FORMAT_VERSION}"
            )
        _check_fields(cls, data, source)
        card = _build(cls, json.loads(json.dumps(data)))  # a deep copy: the card owns its lists
        if len(card.class_names) != card.num_classes:
            raise RobustError(f"{source} has {len(card.class_names)} class names for {card.num_classes} classes")
        if card.channels not in (1, 3):
            raise RobustError(f"{source}: channels must be 1 (grayscale) or 3 (RGB), got {card.channels}")
        if len(card.mean) != card.channels or len(card.std) != card.channels:
            raise RobustError(f"{source}: mean and std need {card.channels} value(s), one per channel")
        return card

    @classmethod
    def from_json(cls, text: str, source: str) -> ModelCard:
        """Parse and check ``model.json`` text (see :meth:`from_dict`)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RobustError(f"{source} is not valid JSON ({exc})") from None
        return cls.from_dict(data, source)


def _check_fields(cls: type, data: dict, source: str, prefix: str = "") -> None:
    """RobustError for the first field of ``data`` that is missing without a default, not of the type ``cls``
    annotates (a record's fields checked in turn, named ``record.field``) or unknown to ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        name, hint = prefix + f.name, hints[f.name]
        if f.name not in data:
            if not _has_default(f):
                raise RobustError(f"{source} has no {name!r} field ({f.metadata['doc']})")
        elif dataclasses.is_dataclass(hint) and isinstance(data[f.name], dict):
            _check_fields(hint, data[f.name], source, f"{name}.")
        elif not _has_type(data[f.name], hint):
            raise RobustError(f"{source}: field {name!r} must be {_type_name(hint)}, got {data[f.name]!r:.80}")
    unknown = [prefix + name for name in sorted(data.keys() - hints.keys())]
    if unknown:
        raise RobustError(f"{source} has unknown fields {unknown[:3]} for version {FORMAT_VERSION}")


def _build(cls: type, data: dict) -> Any:
    """``cls`` from checked JSON values, its record fields built as their dataclasses (absent fields: defaults)."""
    hints = typing.get_type_hints(cls)
    return cls(**{k: _build(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v for k, v in data.items()})


def _has_type(value: object, hint: Any) -> bool:
    """Whether a JSON value fits a field annotation (``float`` takes JSON integers; ``bool`` is not a number)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return not isinstance(value, bool) and isinstance(value, int if hint is int else (int, float))
    return isinstance(value, hint)


def _has_default(f: Field) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)


def new_card(
    arch: str,
    num_classes: int,
    *,
    image_size: int,
    channels: int = 3,
    class_names: Sequence[object] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: int | None = None,
    cifar_stem: bool = False,
    data: str | None = None,
    training: TrainingRecord | None = None,
    robustness: RobustnessRecord | None = None,
) -> ModelCard:
    """The one builder of a model's card, for every way a model comes to be (a new network, a training run, ImageNet
    weights, a network trained elsewhere, a Hugging Face classifier). Defaults: class names ``"0"``..``"n-1"``,
    :func:`default_normalization` for ``channels``, ``resize`` = ``image_size``, an empty training record; a
    class-name count other than ``num_classes`` is a one-line RobustError."""
    names = [str(n) for n in class_names] if class_names else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise RobustError(f"{len(names)} class names given for a model with {num_classes} outputs")
    default_mean, default_std = default_normalization(channels)
    return ModelCard(
        arch=arch,
        num_classes=int(num_classes),
        class_names=names,
        image_size=int(image_size),
        resize=int(resize or image_size),
        channels=int(channels),
        mean=[float(m) for m in (mean or default_mean)],
        std=[float(s) for s in (std or default_std)],
        cifar_stem=bool(cifar_stem),
        data=data,
        training=training or TrainingRecord(),
        robustness=robustness or RobustnessRecord(),
    )


def training_card(
    hparams: Mapping,
    data: Mapping | None,
    metrics: Mapping,
    *,
    alpha: float | None,
    best: dict | None,
    epoch: int | None,
    global_step: int | None,
    adapted: dict | None = None,
) -> ModelCard:
    """The card of an :class:`~robust.training.module.AdversarialClassifier` with ``hparams``, trained on a data
    module that ``describe()``s itself as ``data``; ``metrics`` are its latest ``val/*`` figures, ``alpha`` the
    training step in force (a guard rollback changes it), ``best`` the checkpoint callback's ``{"monitor", "score"}``
    (or None), ``adapted`` how validation's threats adapt to the class count (:func:`robust.threats.adaptations`).
    The one builder of a training run's card: the run record (:mod:`robust.training.run_record`) and checkpoints
    written before cards were stored (:func:`robust.models.resolve.card_from_checkpoint`) call it."""
    hp, data = dict(hparams), dict(data or {})
    size = int(data.get("image_size", 32))
    robustness = RobustnessRecord(
        metrics={k.removeprefix("val/"): float(v) for k, v in metrics.items() if k.startswith("val/")},
        norm=hp.get("norm", "linf"),
        eps=hp.get("eps") if hp.get("val_eps") is None else hp["val_eps"],
        steps=hp.get("val_steps"),
        jpeg_quality=hp.get("jpeg_quality"),
        adapted=adapted,
        best=best,
        epoch=epoch,
        global_step=global_step,
    )
    return new_card(
        hp.get("arch", "resnet18"),
        int(hp.get("num_classes", 10)),
        image_size=size,
        channels=int(hp.get("channels") or data.get("channels") or 3),
        class_names=hp.get("class_names") or data.get("class_names"),
        mean=hp.get("mean"),
        std=hp.get("std"),
        resize=data.get("resize"),
        cifar_stem=bool(hp.get("cifar_stem", False)),
        data=data.get("name"),
        training=TrainingRecord.from_values(hp, alpha=alpha),
        robustness=robustness,
    )
