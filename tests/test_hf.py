"""Hugging Face classifiers through ``hf:<dir>``, offline: tiny models built from ``transformers`` configs.

Two tiny models, saved with ``save_pretrained`` and loaded back through ``robust.load_model("hf:" + dir)``:
a randomly initialised Perceiver (``PerceiverForImageClassificationLearned``; it does not fit reliably in the few
seconds a test may take) and a ResNet fitted, with Hugging Face's own preprocessing, to tell which third (left /
middle / right) of the shared cat photo a crop comes from.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from robust.attacks import fgsm
from robust.data.images import open_image, to_model_input
from robust.defenses import jpeg
from robust.errors import RobustError
from robust.models.card import ModelCard, TrainingRecord
from robust.models.resolve import create_model, load_model

ROOT = Path(__file__).resolve().parents[1]
PHOTO = "photos/cats-coco-000000039769.png"
NAMES = ("left", "middle", "right")
MODELS = ("perceiver", "resnet")


def pixels(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> ``1×3×H×W`` float in [0, 1]."""
    return TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)[None]


def third_crops(photo: Image.Image) -> tuple[list[Image.Image], torch.Tensor]:
    """Nine 240×240 crops of the 640×480 photo (three per column) and their column label 0/1/2."""
    crops = [photo.crop((left, top, left + 240, top + 240)) for top in (0, 120, 240) for left in (0, 200, 400)]
    return crops, torch.tensor([0, 1, 2] * 3)


def tiny_model(kind: str):
    """A randomly initialised tiny HF classifier and its image processor (output 32×32, crop from 36)."""
    import transformers as tr

    labels = {"id2label": dict(enumerate(NAMES)), "label2id": {n: i for i, n in enumerate(NAMES)}}
    if kind == "perceiver":
        # initializer_range 0.3, not 0.02: logits of a few units that depend on the image
        config = tr.PerceiverConfig(
            num_latents=8,
            d_latents=32,
            d_model=512,
            num_blocks=1,
            num_self_attends_per_block=1,
            num_self_attention_heads=1,
            num_cross_attention_heads=1,
            image_size=32,
            initializer_range=0.3,
            **labels,
        )
        net = tr.PerceiverForImageClassificationLearned(config)
        processor = tr.PerceiverImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 36, "width": 36})
    else:
        config = tr.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **labels)
        net = tr.ResNetForImageClassification(config)
        processor = tr.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)
    return net, processor


@pytest.fixture(scope="module")
def photo(shared_data: Path) -> Image.Image:
    return open_image(shared_data / PHOTO)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory, photo: Image.Image) -> dict[str, Path]:
    """Both tiny models saved by kind: the Perceiver as initialised, the ResNet fitted to the nine crops
    (HF preprocessing, 30 Adam steps)."""
    pytest.importorskip("transformers")
    crops, y = third_crops(photo)
    dirs = {}
    for kind in MODELS:
        torch.manual_seed(0)
        net, processor = tiny_model(kind)
        if kind == "resnet":
            inputs = processor(images=crops, return_tensors="pt")["pixel_values"]
            opt = torch.optim.Adam(net.parameters(), lr=1e-2)
            net.train()
            for _ in range(30):
                opt.zero_grad()
                F.cross_entropy(net(inputs).logits, y).backward()
                opt.step()
        dirs[kind] = tmp_path_factory.mktemp(kind)
        net.eval().save_pretrained(dirs[kind])
        processor.save_pretrained(dirs[kind])
    return dirs


def hf_reference(directory: Path, images: list[Image.Image]) -> torch.Tensor:
    """Logits of the raw ``transformers`` model on its own processor's output for PIL ``images``."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    net = AutoModelForImageClassification.from_pretrained(directory).eval()
    inputs = AutoImageProcessor.from_pretrained(directory)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return net(inputs).logits


@pytest.mark.parametrize("kind", MODELS)
def test_card_eval_mode_and_cpu(hf_dirs: dict[str, Path], kind: str) -> None:
    model = load_model(f"hf:{hf_dirs[kind]}")
    card = model.card
    assert card.arch == f"hf:{hf_dirs[kind]}" and card.num_classes == 3
    assert card.class_names == list(NAMES)
    # Perceiver: centre 32/36 of the short side, then 32×32; ResNet (ConvNeXT processor): short side 36, crop 32.
    assert (card.image_size, card.resize) == (32, 36)
    expected_mean = [0.485, 0.456, 0.406] if kind == "perceiver" else [0.5, 0.5, 0.5]
    assert card.mean == pytest.approx(expected_mean) and card.data == "huggingface"
    init = {"weights": f"hf:{hf_dirs[kind]}", "kind": "hf", "sha256": None, "classes": None, "fresh": None}
    assert card.training == TrainingRecord(attack="none", init=init)  # trained elsewhere, as the init record says
    assert ModelCard.from_json(card.to_json(), "the card") == card  # a valid card, JSON round trip
    assert not any(m.training for m in model.modules())
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize("kind", MODELS)
def test_logits_match_the_hf_model(hf_dirs: dict[str, Path], photo: Image.Image, kind: str) -> None:
    """Any-size [0, 1] images through the wrapper ≈ the HF processor + model on the same PIL images."""
    model = load_model(f"hf:{hf_dirs[kind]}")
    images = [photo, photo.crop((13, 7, 346, 258)), *third_crops(photo)[0][:3]]
    expected = hf_reference(hf_dirs[kind], images)
    with torch.no_grad():
        got = torch.cat([model(pixels(img)) for img in images])
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()  # measured: 1.0% (Perceiver), 0.3% (ResNet)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("PerceiverImageProcessor", {}),  # the hub Perceiver's: centre 224/256 of the short side, then 224×224
        ("ConvNextImageProcessor", {"size": {"shortest_edge": 32}, "crop_pct": 0.875}),
        ("ConvNextImageProcessor", {"size": {"shortest_edge": 384}}),  # warps, no crop
        ("ViTImageProcessor", {"size": {"height": 40, "width": 40}}),
        ("BitImageProcessor", {"size": {"shortest_edge": 40}, "crop_size": {"height": 36, "width": 36}}),
    ],
)
def test_preprocessing_matches_the_processor(photo: Image.Image, name: str, kwargs: dict) -> None:
    transformers = pytest.importorskip("transformers")
    from robust.models.build import Normalize
    from robust.models.hf import processor_geometry, processor_normalization

    processor = getattr(transformers, name)(**kwargs)
    geometry = processor_geometry(processor)
    normalize = Normalize(*processor_normalization(processor))
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    for img in (photo, photo.crop((13, 7, 346, 258))):
        expected = processor(images=img, return_tensors="pt")["pixel_values"]
        got = normalize(geometry(pixels(img)))
        assert got.shape == expected.shape
        levels = ((got - expected) * std).abs() * 255  # difference in grey levels
        assert levels.mean() < 0.5 and torch.quantile(levels.flatten(), 0.99) < 2.5
        # The card's resize/image_size make the project's loader show about the processor's region (up to
        # sub-pixel offsets and bilinear resampling): far closer than the plain centre square would be.
        size, resize = geometry.loader_sizes()
        if resize != size:
            shown = expected * std + torch.tensor(processor.image_mean).view(1, 3, 1, 1)
            card_error = (to_model_input(img, size, resize) - shown).abs().mean()
            square_error = (to_model_input(img, size, size) - shown).abs().mean()
            assert card_error < 0.5 * square_error


def test_gradients_reach_the_input_inside_the_crop(hf_dirs: dict[str, Path], photo: Image.Image) -> None:
    model = load_model(f"hf:{hf_dirs['perceiver']}")
    x = pixels(photo).requires_grad_(True)
    F.cross_entropy(model(x), torch.tensor([1])).backward()
    grad = x.grad.abs().sum(1)[0]  # 480×640
    assert torch.isfinite(grad).all() and grad[200:280, 280:360].min() > 0
    # The processor crops the centre int(32/36 · 480) = 426 px square: the sides of the photo are never seen.
    assert grad[:, :100].max() == 0 and grad[:, -100:].max() == 0


@pytest.mark.parametrize("kind", MODELS)
def test_fgsm_changes_predictions(hf_dirs: dict[str, Path], photo: Image.Image, kind: str) -> None:
    """Untargeted FGSM at 8/255 against the model's own predictions on the nine crops, as ``fool`` does."""
    model = load_model(f"hf:{hf_dirs[kind]}")
    crops, truth = third_crops(photo)
    x = torch.cat([to_model_input(img, model.card.image_size, model.card.resize) for img in crops])
    with torch.no_grad():
        y = model(x).argmax(1)
    if kind == "resnet":
        assert (y == truth).float().mean() >= 8 / 9  # the fitted model knows its crops
    eps = 8 / 255
    x_adv = fgsm(model, x, y, eps)
    noise = (x + eps * torch.randn_like(x).sign()).clamp(0, 1)
    with torch.no_grad():
        adv, rand = model(x_adv), model(noise)
    assert (adv.argmax(1) != y).sum() >= 2
    assert F.cross_entropy(adv, y) > F.cross_entropy(rand, y)  # the gradient sign beats random signs
    assert (x_adv - x).abs().max() <= eps + 1e-6
    # JPEG of the adversarial crops runs on the same tensors (the defense sees real pixels).
    with torch.no_grad():
        assert model(jpeg(x_adv)).shape == (9, 3)


def test_fool_cli_writes_its_outputs(hf_dirs: dict[str, Path], shared_data: Path, tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = [
        "fool",
        "--model",
        f"hf:{hf_dirs['perceiver']}",
        "--image",
        str(shared_data / PHOTO),
        "--attack",
        "fgsm",
        "--eps",
        "8/255",
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "original prediction:" in out and "after JPEG" in out
    adversarial = Image.open(tmp_path / "adversarial.png")
    assert adversarial.size == (32, 32)
    assert (tmp_path / "figure.png").stat().st_size > 0 and (tmp_path / "perturbation.png").is_file()


def test_num_classes_replaces_the_head(hf_dirs: dict[str, Path], photo: Image.Image) -> None:
    spec = f"hf:{hf_dirs['resnet']}"
    same, new = create_model(spec, num_classes=3), create_model(spec, num_classes=5)
    assert same.training and new.training  # fresh, ready for fine-tuning
    x = pixels(photo)
    with torch.no_grad():
        assert torch.equal(same.eval()(x), load_model(spec)(x))
        assert new(x).shape == (1, 5) and new.card.num_classes == 5


def test_missing_transformers_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from robust.models.hf import load_hf_model

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(RobustError, match=r"robust\[hf\] extra"):
        load_model("hf:deepmind/vision-perceiver-learned")
    with pytest.raises(RobustError, match=r"robust\[hf\] extra"):
        load_hf_model("deepmind/vision-perceiver-learned")


def test_bad_specs_are_clear_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail without retries
    with pytest.raises(RobustError, match="could not load Hugging Face image classifier 'no-such-org/no-such-model'"):
        load_model("hf:no-such-org/no-such-model")
    with pytest.raises(RobustError, match="is not a directory"):
        load_model(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(RobustError, match="could not load"):
        load_model(f"hf:{tmp_path}")  # a directory without a model
    with pytest.raises(RobustError, match="model id or directory"):
        load_model("hf:")
