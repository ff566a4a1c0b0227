"""Models: normalization inside, torchvision weights API (offline, with a file the test writes), paths."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from robust.errors import RobustError
from robust.models.build import Normalize, build_model, imagenet_class_names


def test_model_normalizes_inside_and_outputs_logits():
    model = build_model("resnet18", num_classes=7, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), cifar_stem=True).eval()
    assert isinstance(model[0], Normalize)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model.backbone(model.normalize(x)))
        assert torch.allclose(model.normalize(x), (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2)
    assert model(x).shape == (2, 7)
    keys = model.state_dict().keys()
    assert "normalize.mean" in keys and "normalize.std" in keys and "backbone.fc.weight" in keys
    assert model.backbone.conv1.kernel_size == (3, 3)


@pytest.fixture
def hub_with_fake_imagenet_file(tmp_path, monkeypatch):
    """torchvision-format ImageNet ResNet18 weights written where torchvision's weights API looks."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1])
    return state


def test_imagenet_weights_through_torchvision_api(hub_with_fake_imagenet_file):
    state = hub_with_fake_imagenet_file
    full = build_model(weights="imagenet", num_classes=1000)
    assert torch.equal(full.backbone.fc.weight, state["fc.weight"])
    tuned = build_model(weights="imagenet", num_classes=5)
    assert torch.equal(tuned.backbone.conv1.weight, state["conv1.weight"])
    assert tuned.backbone.fc.out_features == 5  # new head for fine-tuning
    assert len(imagenet_class_names()) == 1000 and imagenet_class_names()[1] == "goldfish"


def test_imagenet_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RobustError, match="could not download"):
        build_model(weights="imagenet", num_classes=10)


def test_weights_from_a_torchvision_file(tmp_path):
    torch.manual_seed(2)
    src = torchvision.models.resnet18(num_classes=4)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = build_model(weights=str(tmp_path / "w.pth"), num_classes=4).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.backbone(x), src.eval()(x))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"arch": "vgg99"}, "unknown arch"),
        ({"num_classes": 1}, "num_classes"),
        ({"weights": "/nonexistent/w.pth"}, "does not exist"),
        ({"mean": (0.5, 0.5), "std": (0.1, 0.1, 0.1)}, "mean and std"),
    ],
)
def test_bad_model_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(RobustError, match=match):
        build_model(**kwargs)


def test_garbage_weights_file_is_a_clear_error(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RobustError, match="not a readable"):
        build_model(weights=str(tmp_path / "w.pth"))


class WithFixedBuffer(torch.nn.Module):
    """A user's network holding a non-persistent buffer: no state dict restores it."""

    def __init__(self, num_classes: int = 10, channels: int = 3) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 4, 3)
        self.fc = torch.nn.Linear(4, num_classes)
        self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)) * self.scale)


def test_an_empty_network_is_uninitialised_only_where_a_state_dict_fills_it(monkeypatch):
    """A load builds the network without its random init (:func:`robust.models.archs.empty_arch`): every tensor is
    allocated on the CPU and a whole state dict fills it; a network with a buffer no state dict holds is built as
    usual, so the buffer keeps its value."""
    from robust.models.archs import ARCHS, Arch, empty_arch

    assert empty_arch("resnet18", 10, cifar_stem=True).conv1.kernel_size == (3, 3)
    resnet = empty_arch("resnet18", 10)
    assert {t.device.type for t in resnet.state_dict().values()} == {"cpu"}
    source = torchvision.models.resnet18(num_classes=10)
    resnet.load_state_dict(source.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(resnet.eval()(x), source.eval()(x))
    monkeypatch.setitem(ARCHS, "with_buffer", Arch(WithFixedBuffer, "conv", "fc", 8, 3, "tests/test_models.py"))
    assert float(empty_arch("with_buffer", 10).scale) == 2.0
    with pytest.raises(RobustError, match="num_classes must be at least 2"):
        empty_arch("resnet18", 1)
