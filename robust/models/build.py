"""Models that take plain [0, 1] images: ``nn.Sequential(Normalize, backbone)``; backbones from
:mod:`robust.models.archs`.

Normalization is the model's first layer, so attacks, JPEG and exported models all work in pixel space.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from robust.errors import RobustError
from robust.models.archs import build_arch, get_arch
from robust.models.card import (  # noqa: F401  (the normalization defaults, re-exported as before)
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelCard,
    default_normalization,
)


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
    """A loaded classifier: the layers of a model (``N×C×H×W`` images in [0, 1] -> logits) and its
    :class:`~robust.models.card.ModelCard` in ``card``. The layers are shared with the model it wraps, so state dict
    keys, weights and outputs are that model's."""

    def __init__(self, model: nn.Sequential, card: ModelCard) -> None:
        super().__init__(OrderedDict(model.named_children()))
        self.card = card
        self.training = model.training  # the layers keep their own modes

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and x.shape[1] != self.card.channels:
            kind = {1: "grayscale", 3: "RGB"}
            raise RobustError(
                f"the images have {x.shape[1]} channel(s) ({kind.get(x.shape[1], '?')}); the model "
                f"takes {self.card.channels} ({kind[self.card.channels]})"
            )
        return super().forward(x)


def card_of(model: nn.Module) -> ModelCard | None:
    """The card a :class:`CardedModel` carries; ``None`` for any other network."""
    return model.card if isinstance(model, CardedModel) else None


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
            raise RobustError(
                f"{source} does not fit {fits}: {key} has shape {shape}, the model needs {tuple(tensor.shape)}"
            )
    model.load_state_dict(state)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A plain state dict file (``model.state_dict()`` saved with ``torch.save``: a torchvision ``.pth``, a paper's
    released weights), loaded with ``weights_only=True`` (no pickled code can run). A ``module.`` prefix
    (``nn.DataParallel``) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise RobustError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RobustError(f"{path} is not a readable torch weights file ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        raise RobustError(f"{path} is a Lightning checkpoint, not a plain state dict: name it *.ckpt")
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise RobustError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
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
        raise RobustError(
            f"could not download the ImageNet weights for {arch} ({exc}); put {file.name} in {file.parent}"
        ) from None


def load_pretrained(backbone: nn.Module, arch: str, state: Mapping[str, Tensor], source: str) -> list[str]:
    """Load ``state`` (a state dict of the backbone ``arch``, from ``source``, named in errors) into ``backbone``,
    already shaped for its task, and return the names of the layers left freshly initialised: the head (``fc`` of a
    ResNet) when ``state``'s class count differs, the stem (``conv1``) when a ResNet backbone has the CIFAR stem and
    ``state`` has torchvision's 7×7 one. Anything else that does not fit (another channel count included) is a
    RobustError (one sentence)."""
    spec, fresh, state = get_arch(arch), [], dict(state)
    for layer in (spec.head, spec.stem):
        theirs, ours = state.get(f"{layer}.weight"), getattr(backbone, layer).weight
        if theirs is None or theirs.shape == ours.shape:
            continue
        if layer == spec.stem and theirs.shape[1] != ours.shape[1]:
            raise RobustError(
                f"{source} takes {theirs.shape[1]}-channel images; the model has {ours.shape[1]} "
                "channel(s): set channels to match"
            )
        if layer == spec.stem and ours.shape[-1] > theirs.shape[-1]:
            raise RobustError(f"{source} was trained with the CIFAR stem (3×3 conv1): set cifar_stem true")
        if layer == spec.head and theirs.shape[1:] != ours.shape[1:]:
            continue  # a different feature width: a different architecture, reported by load_state below
        fresh.append(layer)
        state.update({f"{layer}.{k}": v for k, v in getattr(backbone, layer).state_dict().items()})
    load_state(backbone, state, source, f"a {arch}")
    return fresh


def build_backbone(
    arch: str,
    num_classes: int,
    weights: str | Mapping[str, Tensor] | None = None,
    cifar_stem: bool = False,
    channels: int | None = None,
) -> tuple[nn.Module, list[str]]:
    """The backbone ``arch`` (:data:`robust.models.archs.ARCHS`) with ``num_classes`` outputs and ``channels`` input
    channels (default the arch's), and the names of the layers that the weights did not initialise (``[]`` for
    ``weights=None``: all of it is random).

    Args:
        weights: ``None`` (random init), ``"imagenet"`` (torchvision's ImageNet weights of a torchvision ResNet,
            downloaded by torchvision to its hub cache), a path to a state dict file of that arch, or such a state
            dict. When the weights have a different number of classes, the head is new (fine-tuning); with
            ``cifar_stem`` and weights made for torchvision's stem, ``conv1`` is new (:func:`load_pretrained`).
        cifar_stem: 3×3 stride-1 first convolution and no max-pool, for 32×32 inputs (torchvision ResNets).
    """
    backbone = build_arch(arch, num_classes, channels, cifar_stem)
    if weights is None:
        return backbone, []
    if isinstance(weights, Mapping):
        state, source = weights, "the given weights"
    elif weights == "imagenet":
        if not get_arch(arch).torchvision:
            raise RobustError(f"there are no ImageNet weights for {arch}; torchvision's ResNets have them")
        state, source = imagenet_state(arch), f"torchvision's ImageNet {arch}"
    else:
        state, source = read_state_dict(weights), str(weights)
    return backbone, load_pretrained(backbone, arch, state, source)


def build_model(
    arch: str = "resnet18",
    num_classes: int = 10,
    weights: str | Mapping[str, Tensor] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    cifar_stem: bool = False,
    channels: int | None = None,
) -> nn.Sequential:
    """``Sequential(normalize=Normalize(mean, std), backbone=<arch>)``: input ``N×C×H×W`` in [0, 1] -> logits,
    with ``C = channels`` (default the arch's: 1 for ``mnist_net``, else 3; ``mean``/``std`` need one value per
    channel).

    See :func:`build_backbone` for ``weights`` and ``cifar_stem``. The backbone's state dict keys are the arch's
    own (torchvision's, the papers'), under the ``backbone.`` prefix. Like any new module, it is in train mode.
    Hugging Face classifiers (``hf:<id>``) and our checkpoints and exports as ``weights`` come from
    :func:`robust.models.resolve.create_model`.
    """
    backbone = build_backbone(arch, num_classes, weights, cifar_stem, channels)[0]
    return normalized(backbone, mean, std)


def normalized(backbone: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """``Sequential(normalize=Normalize(mean, std), backbone=backbone)``; ``mean``/``std`` must have one value per
    input channel of ``backbone`` (checked against its first convolution)."""
    first_conv = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and len(mean) != first_conv.in_channels:
        raise RobustError(
            f"mean and std need one value per channel: the model takes {first_conv.in_channels} "
            f"channel(s), got {len(mean)} values"
        )
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
