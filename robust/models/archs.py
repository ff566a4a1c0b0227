"""The architecture registry: every backbone a model can have, by name, in one place.

A backbone maps normalized ``N×C×H×W`` images to ``N×num_classes`` logits (the model's first layer, a
:class:`robust.models.build.Normalize`, sits in front of it). :data:`ARCHS` maps a name to an :class:`Arch`: how to
build
it for ``num_classes`` outputs and ``channels`` input channels, the names of its first convolution and its head
(the layers fine-tuning may replace), and its natural input size. Training (``--model.arch``), the model card,
:func:`robust.load_model` and the report all look names up here; adding an architecture is one entry.

- ``resnet18``, ``resnet34``, ``resnet50``: torchvision's ResNets (ImageNet weights available; optional CIFAR stem).
- ``mnist_net``: Wong, Rice & Kolter 2020's MNIST CNN (``locuslab/fast_adversarial`` ``MNIST/mnist_net.py``), 28×28.
- ``preact_resnet18``: their CIFAR-10 PreAct ResNet-18 (``CIFAR10/preact_resnet.py``), 32×32.

The two papers' networks keep the authors' layer names, so the state dicts they release load as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from robust.errors import RobustError


def mnist_net(num_classes: int = 10, channels: int = 1) -> nn.Sequential:
    """conv 16×4×4 s2 p1, ReLU, conv 32×4×4 s2 p1, ReLU, flatten, linear 1568→100, ReLU, linear 100→classes.

    Input ``N×channels×28×28``. Layer indices (``0``, ``2``, ``5``, ``7``) are the authors', so their
    ``fgsm.pth`` and ``pgd_madry.pth`` state dicts load unchanged."""
    return nn.Sequential(
        nn.Conv2d(channels, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): BN-ReLU-conv twice, 1×1 conv shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(x) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 32×32 images (fast_adversarial's CIFAR-10 model). The final 4×4 average pool is an
    adaptive one: the same result at 32×32, and other sizes work too."""

    def __init__(self, num_classes: int = 10, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        planes_in, layers = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(PreActBlock(planes_in, planes, stride), PreActBlock(planes, planes, 1)))
            planes_in = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.linear(out)


def _torchvision_resnet(name: str) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, channels: int) -> nn.Module:
        net = torchvision.models.get_model(name, num_classes=num_classes)
        if channels != 3:
            net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return net

    return build


@dataclass(frozen=True)
class Arch:
    """One architecture: ``build(num_classes, channels)`` -> backbone; ``stem`` and ``head``: the attribute names
    of its first convolution and last linear layer; ``image_size``: its natural input size in pixels;
    ``channels``: its usual input channels; ``torchvision``: a torchvision ResNet (ImageNet weights and the CIFAR
    stem apply); ``source``: where it comes from."""

    build: Callable[[int, int], nn.Module]
    stem: str
    head: str
    image_size: int
    channels: int
    source: str
    torchvision: bool = False


ARCHS: dict[str, Arch] = {
    **{
        name: Arch(_torchvision_resnet(name), "conv1", "fc", 224, 3, f"torchvision.models.{name}", torchvision=True)
        for name in ("resnet18", "resnet34", "resnet50")
    },
    "mnist_net": Arch(mnist_net, "0", "7", 28, 1, "Wong et al. 2020, locuslab/fast_adversarial MNIST/mnist_net.py"),
    "preact_resnet18": Arch(
        PreActResNet18, "conv1", "linear", 32, 3, "Wong et al. 2020, locuslab/fast_adversarial CIFAR10/preact_resnet.py"
    ),
}


def get_arch(name: str) -> Arch:
    """The :class:`Arch` called ``name``; one-line RobustError naming the known ones otherwise."""
    if name not in ARCHS:
        raise RobustError(f"unknown arch {name!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


def use_cifar_stem(backbone: nn.Module, channels: int = 3) -> None:
    """Give a torchvision ResNet the CIFAR stem: a new 3×3 stride-1 first convolution and no max-pool."""
    backbone.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()


def build_arch(name: str, num_classes: int, channels: int | None = None, cifar_stem: bool = False) -> nn.Module:
    """A freshly initialised backbone ``name`` with ``num_classes`` outputs taking ``channels`` input channels
    (default: the arch's usual count); ``cifar_stem`` for torchvision ResNets only."""
    arch = get_arch(name)
    if num_classes < 2:
        raise RobustError(f"num_classes must be at least 2, got {num_classes}")
    channels = arch.channels if channels is None else int(channels)
    if channels not in (1, 3):
        raise RobustError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if cifar_stem and not arch.torchvision:
        raise RobustError(f"cifar_stem applies to torchvision ResNets; {name} has its own stem: set cifar_stem false")
    backbone = arch.build(num_classes, channels)
    if cifar_stem:
        use_cifar_stem(backbone, channels)
    return backbone


def empty_arch(name: str, num_classes: int, channels: int | None = None, cifar_stem: bool = False) -> nn.Module:
    """:func:`build_arch`'s backbone with its parameters allocated but not initialised, for a whole state dict to
    fill: a load skips the random init it would overwrite (a ResNet18's is 0.1-0.2 s on a CPU). Built on the meta
    device; a network that cannot be built there, or holds buffers no state dict restores (non-persistent ones), is
    built by :func:`build_arch` instead."""
    try:
        with torch.device("meta"):
            backbone = build_arch(name, num_classes, channels, cifar_stem)
    except RobustError:
        raise
    except Exception:  # a user's network may compute on its tensors while it is built
        return build_arch(name, num_classes, channels, cifar_stem)
    stored = backbone.state_dict().keys()
    if any(key not in stored for key, _ in (*backbone.named_parameters(), *backbone.named_buffers())):
        return build_arch(name, num_classes, channels, cifar_stem)
    return backbone.to_empty(device="cpu")
