"""Models that take plain [0, 1] images: ``nn.Sequential(Normalize, backbone)``.

Normalization is the model's first layer, so attacks, JPEG and exported models all work in pixel space.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
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


HEAD, STEM = "fc", "conv1"  # the torchvision ResNet layers a task may replace when fine-tuning


def load_state(model: nn.Module, state: Mapping[str, Tensor], source: str, fits: str) -> None:
    """``model.load_state_dict(state)``, RobustError with one sentence (``"{source} does not fit {fits}: ..."``) for
    missing, extra or mis-shaped tensors."""
    expected = model.state_dict()
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        raise RobustError(f"{source} does not fit {fits}: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, tensor in expected.items():
        shape = tuple(getattr(state[key], "shape", ()))
        if not isinstance(state[key], Tensor) or shape != tuple(tensor.shape):
            raise RobustError(f"{source} does not fit {fits}: {key} has shape {shape}, the model needs "
                              f"{tuple(tensor.shape)}")  # fmt: skip
    model.load_state_dict(state)


def read_torchvision_file(path: str | Path) -> dict[str, Tensor]:
    """A torchvision-format ResNet state dict file (``resnet18(...).state_dict()`` saved with ``torch.save``), loaded
    with ``weights_only=True`` (no pickled code can run)."""
    path = Path(path)
    if not path.is_file():
        raise RobustError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RobustError(f"{path} is not a readable torch weights file ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        raise RobustError(f"{path} is a Lightning checkpoint, not a torchvision state dict: name it *.ckpt")
    if not isinstance(state, dict) or f"{HEAD}.weight" not in state:
        raise RobustError(f"{path} is not a torchvision ResNet state dict (no '{HEAD}.weight')")
    return state


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision keeps (or downloads) the ImageNet weights of ``arch``: its hub cache."""
    url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def imagenet_state(arch: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights of ``arch`` (``IMAGENET1K_V1``; downloaded by torchvision, hash-checked)."""
    try:
        return torchvision.models.get_model_weights(arch).IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
    except OSError as exc:  # URLError is an OSError: offline and not in the hub cache
        file = imagenet_weights_file(arch)
        raise RobustError(f"could not download the ImageNet weights for {arch} ({exc}); put {file.name} in "
                          f"{file.parent}") from None  # fmt: skip


def use_cifar_stem(backbone: nn.Module) -> None:
    """Give a torchvision ResNet the CIFAR stem: a new 3×3 stride-1 first convolution and no max-pool."""
    backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()


def load_pretrained(backbone: nn.Module, state: Mapping[str, Tensor], source: str) -> list[str]:
    """Load a torchvision-format ``state`` (from ``source``, named in errors) into ``backbone``, a torchvision ResNet
    already shaped for its task, and return the names of the layers left freshly initialised: ``fc`` (the head)
    when ``state``'s class count differs, ``conv1`` when the backbone has the CIFAR stem and ``state`` has
    torchvision's 7×7 one. Anything else that does not fit is a RobustError (one sentence)."""
    fresh, state = [], dict(state)
    for layer in (HEAD, STEM):
        theirs, ours = state.get(f"{layer}.weight"), getattr(backbone, layer).weight
        if theirs is None or theirs.shape == ours.shape:
            continue
        if layer == STEM and ours.shape[-1] > theirs.shape[-1]:
            raise RobustError(f"{source} was trained with the CIFAR stem (3×3 conv1): set cifar_stem true")
        if layer == HEAD and theirs.shape[1:] != ours.shape[1:]:
            continue  # a different feature width: a different architecture, reported by load_state below
        fresh.append(layer)
        state.update({f"{layer}.{k}": v for k, v in getattr(backbone, layer).state_dict().items()})
    load_state(backbone, state, source, f"a torchvision {type(backbone).__name__}")
    return fresh


def build_backbone(
    arch: str, num_classes: int, weights: str | Mapping[str, Tensor] | None = None, cifar_stem: bool = False
) -> tuple[nn.Module, list[str]]:
    """A torchvision ResNet with ``num_classes`` outputs, and the names of the layers that the weights did not
    initialise (``[]`` for ``weights=None``: all of it is random).

    Args:
        weights: ``None`` (random init), ``"imagenet"`` (torchvision's ImageNet weights, downloaded by
            torchvision to its hub cache), a path to a torchvision-format state dict file, or such a state dict.
            When the weights have a different number of classes, the head (``fc``) is new (fine-tuning); with
            ``cifar_stem`` and weights made for torchvision's stem, ``conv1`` is new (:func:`load_pretrained`).
        cifar_stem: 3×3 stride-1 first convolution and no max-pool, for 32×32 inputs.
    """
    if arch not in ARCHS:
        raise RobustError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if num_classes < 2:
        raise RobustError(f"num_classes must be at least 2, got {num_classes}")
    backbone = torchvision.models.get_model(arch, num_classes=num_classes)
    if cifar_stem:
        use_cifar_stem(backbone)
    if weights is None:
        return backbone, []
    if isinstance(weights, Mapping):
        state, source = weights, "the given weights"
    elif weights == "imagenet":
        state, source = imagenet_state(arch), f"torchvision's ImageNet {arch}"
    else:
        state, source = read_torchvision_file(weights), str(weights)
    return backbone, load_pretrained(backbone, state, source)


def build_model(
    arch: str = "resnet18",
    num_classes: int = 10,
    weights: str | Mapping[str, Tensor] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    cifar_stem: bool = False,
) -> nn.Sequential:
    """``Sequential(normalize=Normalize(mean, std), backbone=ResNet)``: input ``N×3×H×W`` in [0, 1] -> logits.

    See :func:`build_backbone` for ``weights`` and ``cifar_stem``. The backbone's state dict keys are
    torchvision's, under the ``backbone.`` prefix. Like any new module, it is in train mode. Hugging Face
    classifiers (``hf:<id>``) and our checkpoints and exports as ``weights`` come from
    :func:`robust.loading.build_classifier`.
    """
    return normalized(build_backbone(arch, num_classes, weights, cifar_stem)[0], mean, std)


def normalized(backbone: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """``Sequential(normalize=Normalize(mean, std), backbone=backbone)``."""
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), backbone=backbone))


def head_of(model: nn.Module) -> nn.Linear:
    """The classification head: the model's last ``nn.Linear`` (``backbone.fc`` of a torchvision ResNet, the
    ``classifier`` of a Hugging Face ViT, ConvNeXt or ResNet)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise RobustError(f"{type(model).__name__} has no linear classification head")
    return linears[-1]


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names as torchvision ships them (no download)."""
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
