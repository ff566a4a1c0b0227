"""Models that take plain [0, 1] images: ``nn.Sequential(Normalize, backbone)``.

Normalization is the model's first layer, so attacks, JPEG and exported models all work in pixel space.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from robust.card import ModelCard
from robust.errors import RobustError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
ARCHS = ("resnet18", "resnet34", "resnet50")


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``x`` is ``N×C×H×W`` in [0, 1]. Mean/std are saved buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise RobustError(f"mean and std need one value per channel and std > 0, got {mean} / {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class CardedModel(nn.Sequential):
    """A loaded classifier: the layers of a model (``N×3×H×W`` images in [0, 1] -> logits) and its
    :class:`~robust.card.ModelCard` in ``card``. The layers are shared with the model it wraps, so state dict
    keys, weights and outputs are that model's."""

    def __init__(self, model: nn.Sequential, card: ModelCard) -> None:
        super().__init__(OrderedDict(model.named_children()))
        self.card = card
        self.training = model.training  # the layers keep their own modes


def card_of(model: nn.Module) -> ModelCard | None:
    """The card a :class:`CardedModel` carries; ``None`` for any other network."""
    return model.card if isinstance(model, CardedModel) else None


def _load_torchvision_file(arch: str, path: Path) -> nn.Module:
    """A torchvision-format backbone state dict file (``resnet18(...).state_dict()``), loaded safely."""
    if not path.is_file():
        raise RobustError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RobustError(f"{path} is not a readable torch weights file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise RobustError(f"{path} is not a torchvision {arch} state dict (no 'fc.weight')")
    backbone = torchvision.models.get_model(arch, num_classes=state["fc.weight"].shape[0])
    try:
        backbone.load_state_dict(state)
    except RuntimeError as exc:
        raise RobustError(f"{path} does not fit a torchvision {arch}: {str(exc).splitlines()[0]}") from None
    return backbone


def build_backbone(arch: str, num_classes: int, weights: str | None = None, cifar_stem: bool = False) -> nn.Module:
    """A torchvision ResNet with ``num_classes`` outputs.

    Args:
        weights: ``None`` (random init), ``"imagenet"`` (torchvision's ImageNet weights, downloaded by
            torchvision to its hub cache), or a path to a torchvision-format state dict file. When the
            weights have a different number of classes, the final layer is replaced (fine-tuning).
        cifar_stem: 3×3 stride-1 first convolution and no max-pool, for 32×32 inputs.
    """
    if arch not in ARCHS:
        raise RobustError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if num_classes < 2:
        raise RobustError(f"num_classes must be at least 2, got {num_classes}")
    if weights is None:
        backbone = torchvision.models.get_model(arch, num_classes=num_classes)
    elif weights == "imagenet":
        enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        try:
            backbone = torchvision.models.get_model(arch, weights=enum)
        except OSError as exc:  # URLError is an OSError: offline and not in the hub cache
            raise RobustError(
                f"could not download the ImageNet weights for {arch} ({exc}); put "
                f"{enum.url.rsplit('/', 1)[-1]} in {torch.hub.get_dir()}/checkpoints"
            ) from None
    else:
        backbone = _load_torchvision_file(arch, Path(weights))
    if backbone.fc.out_features != num_classes:
        backbone.fc = nn.Linear(backbone.fc.in_features, num_classes)
    if cifar_stem:
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        backbone.maxpool = nn.Identity()
    return backbone


def build_model(
    arch: str = "resnet18",
    num_classes: int = 10,
    weights: str | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    cifar_stem: bool = False,
) -> nn.Sequential:
    """``Sequential(normalize=Normalize(mean, std), backbone=ResNet)``: input ``N×3×H×W`` in [0, 1] -> logits.

    See :func:`build_backbone` for ``weights`` and ``cifar_stem``. The backbone's state dict keys are
    torchvision's, under the ``backbone.`` prefix. Like any new module, it is in train mode. Hugging Face
    classifiers (``hf:<id>``) come from :func:`robust.loading.build_classifier`.
    """
    return nn.Sequential(
        OrderedDict(normalize=Normalize(mean, std), backbone=build_backbone(arch, num_classes, weights, cifar_stem))
    )


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names as torchvision ships them (no download)."""
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
