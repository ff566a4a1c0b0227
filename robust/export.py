"""Load trained models for evaluation and deployment.

``load_model(path)`` returns the ``nn.Sequential(Normalize, backbone)`` in eval mode, on CPU, with a
``card`` dict attribute (the model card: arch, num_classes, class_names, image_size, resize, mean, std, ...).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from robust.checkpointing import load_checkpoint
from robust.errors import RobustError
from robust.models import IMAGENET_MEAN, IMAGENET_STD, build_model, imagenet_class_names


def card_from_checkpoint(ckpt: dict) -> dict:
    """The model card fields known from a Lightning checkpoint of :class:`AdversarialClassifier`."""
    hp = dict(ckpt.get("hyper_parameters") or {})
    data = dict(ckpt.get("robust_data") or {})
    num_classes = int(hp.get("num_classes", 10))
    names = hp.get("class_names") or data.get("class_names") or [str(i) for i in range(num_classes)]
    size = int(data.get("image_size", 32))
    return {
        "arch": hp.get("arch", "resnet18"), "num_classes": num_classes, "class_names": list(names),
        "cifar_stem": bool(hp.get("cifar_stem", False)), "mean": list(hp.get("mean")), "std": list(hp.get("std")),
        "image_size": size, "resize": int(data.get("resize") or size), "data": data.get("name"),
        "training": {k: hp.get(k) for k in ("attack", "target", "eps", "alpha", "adv_ratio", "attack_steps")},
    }  # fmt: skip


def model_from_checkpoint(path: str | Path) -> nn.Module:
    """The trained network of a ``.ckpt`` (loaded with ``weights_only=True``), eval mode, with ``card``."""
    ckpt = load_checkpoint(path)
    card = card_from_checkpoint(ckpt)
    model = build_model(card["arch"], card["num_classes"], None, card["mean"], card["std"], card["cifar_stem"])
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RobustError(f"{path} does not match its own model description: {str(exc).splitlines()[0]}") from None
    model.card = card
    return model.eval()


def imagenet_model() -> nn.Module:
    """torchvision's ImageNet ResNet18 (downloaded by torchvision for online users) with its card."""
    model = build_model("resnet18", 1000, "imagenet", IMAGENET_MEAN, IMAGENET_STD)
    model.card = {
        "arch": "resnet18", "num_classes": 1000, "class_names": imagenet_class_names(), "cifar_stem": False,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "image_size": 224, "resize": 256,
        "data": "ImageNet", "training": {"attack": "none"},
    }  # fmt: skip
    return model.eval()


def load_model(spec: str | Path) -> nn.Module:
    """Load a model for evaluation: eval mode, CPU, with a ``model.card`` dict.

    ``spec`` is a Lightning checkpoint (``.ckpt``, loaded with ``weights_only=True``), ``"imagenet"``
    (torchvision's ImageNet ResNet18) or ``"hf:<model id or local dir>"`` (a Hugging Face classifier).
    """
    text = str(spec)
    if text == "imagenet":
        return imagenet_model()
    if text.startswith("hf:"):
        from robust.hf import load_hf_model

        return load_hf_model(text[3:])
    path = Path(spec)
    if path.is_file():
        return model_from_checkpoint(path)
    raise RobustError(f"model {text!r} not found: give a .ckpt file, 'imagenet' or 'hf:<model id or dir>'")
