"""Adversarial fine-tuning: ``weights`` from a torchvision .pth, one of our checkpoints or an export folder; head
swap when the class count differs; a smaller backbone learning rate; the card's record of the initial weights."""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from conftest import tiny_fit_args

import train
from robust.errors import RobustError
from robust.export.folder import export_model
from robust.models.build import build_model
from robust.models.resolve import load_model
from robust.training.module import AdversarialClassifier
from robust.training.optim import Cosine, OneCycle

DIGITS = {"mean": (0.5,) * 3, "std": (0.5,) * 3}  # the fixtures' normalization (torchvision stem)


@pytest.fixture(scope="module")
def sources(_resnet18_session, resnet18_ckpt, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each kind of weights source of ``resnet18_model``: kind -> (the spec to pass, the file its sha256 is of)."""
    folder = tmp_path_factory.mktemp("sources")
    torch.save(_resnet18_session.backbone.state_dict(), folder / "digits.pth")
    export = export_model(resnet18_ckpt, folder / "export")
    return {
        "state_dict": (folder / "digits.pth", folder / "digits.pth"),
        "checkpoint": (resnet18_ckpt, resnet18_ckpt),
        "export": (export, export / "model.safetensors"),
    }


def fine_tune_module(weights, num_classes: int = 10, **kw) -> AdversarialClassifier:
    return AdversarialClassifier(num_classes=num_classes, weights=str(weights), attack="none", **{**DIGITS, **kw})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["state_dict", "checkpoint", "export"])
def test_each_source_kind_loads_the_source_model(kind, sources, resnet18_model, digits_val):
    spec, hashed = sources[kind]
    module = fine_tune_module(spec).eval()
    x = digits_val[0][:16]
    with torch.no_grad():
        assert torch.allclose(module(x), resnet18_model(x), atol=1e-5, rtol=1e-5)
    assert module.weights_init == {
        "weights": str(spec),
        "kind": kind,
        "sha256": sha256(hashed),
        "classes": 10,
        "fresh": [],
    }


@pytest.mark.parametrize("kind", ["state_dict", "checkpoint", "export"])
def test_a_different_class_count_gets_a_fresh_head(kind, sources, resnet18_model, caplog):
    with caplog.at_level(logging.INFO):
        module = fine_tune_module(sources[kind][0], num_classes=5)
    source, tuned = resnet18_model.backbone.state_dict(), module.model.backbone.state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in source.items() if not k.startswith("fc."))
    assert tuned["fc.weight"].shape == (5, 512) and tuned["fc.bias"].shape == (5,)
    assert not torch.allclose(tuned["fc.weight"], source["fc.weight"][:5])  # fresh, not the first five rows
    assert module.weights_init["fresh"] == ["fc"] and module.weights_init["classes"] == 10
    assert [r.getMessage() for r in caplog.records if "initial weights" in r.getMessage()] == [
        f"initial weights: {sources[kind][0]} ({kind}, sha256 {sha256(sources[kind][1])[:12]}…): a new 5-class head "
        "(fc; the weights have 10 classes)"
    ]


def test_torchvision_stem_weights_get_a_fresh_cifar_stem_and_the_reverse_is_refused(tmp_path):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "plain.pth")
    module = fine_tune_module(tmp_path / "plain.pth", cifar_stem=True)
    assert module.weights_init["fresh"] == ["fc", "conv1"] and module.model.backbone.conv1.kernel_size == (3, 3)
    torch.save(build_model(num_classes=10, cifar_stem=True).backbone.state_dict(), tmp_path / "stem.pth")
    assert fine_tune_module(tmp_path / "stem.pth", cifar_stem=True).weights_init["fresh"] == []
    with pytest.raises(RobustError, match="trained with the CIFAR stem"):
        fine_tune_module(tmp_path / "stem.pth", cifar_stem=False)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("resnet34.pth", r"resnet34.pth does not fit a resnet18: missing \[\], unexpected \['layer1.2"),
        ("ckpt as resnet34", "holds a resnet18, not a resnet34: set arch resnet18"),
        ("other mean", r"was trained with normalization mean \[0.5, 0.5, 0.5\], not \[0.4, 0.4, 0.4\]"),
        ("missing", "not found: give an export folder, a .ckpt file, a state dict file with its arch"),
        ("garbage.pth", "is not a readable torch weights file"),
        ("ckpt as .pth", "is a Lightning checkpoint, not a plain state dict: name it"),
    ],
)
def test_bad_sources_are_one_line_errors(case, match, resnet18_ckpt, tmp_path):
    kw = {}
    if case == "resnet34.pth":
        weights = tmp_path / case
        torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), weights)
    elif case == "ckpt as resnet34":
        weights, kw = resnet18_ckpt, {"arch": "resnet34"}
    elif case == "other mean":
        weights, kw = resnet18_ckpt, {"mean": (0.4,) * 3}
    elif case == "missing":
        weights = tmp_path / "nowhere.ckpt"
    elif case == "garbage.pth":
        weights = tmp_path / case
        weights.write_bytes(b"not a checkpoint")
    else:
        weights = tmp_path / "model.pth"
        weights.write_bytes(resnet18_ckpt.read_bytes())
    with pytest.raises(RobustError, match=match) as info:
        fine_tune_module(weights, **kw)
    assert "\n" not in str(info.value)


def test_hf_arch_refuses_weights():
    with pytest.raises(RobustError, match="weights are for the archs of robust.models.archs"):
        AdversarialClassifier(arch="hf:org/name", weights="imagenet")


@pytest.mark.parametrize("schedule", [OneCycle, Cosine])
def test_backbone_and_head_groups_get_scaled_and_full_lr(schedule):
    module = AdversarialClassifier(
        num_classes=4,
        optimizer=partial(torch.optim.SGD, lr=0.2),
        backbone_lr_scale=0.1,
        lr_scheduler=schedule,
        attack="none",
    )
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    backbone, head = opt.param_groups
    assert (backbone["name"], head["name"]) == ("backbone", "head")
    assert [id(p) for p in head["params"]] == [id(module.model.backbone.fc.weight), id(module.model.backbone.fc.bias)]
    assert len(backbone["params"]) + 2 == len(list(module.parameters()))
    peaks = [g["max_lr"] for g in opt.param_groups] if schedule is OneCycle else sched.base_lrs
    assert peaks == pytest.approx([0.02, 0.2])


def test_default_scale_keeps_one_group():
    module = AdversarialClassifier(
        num_classes=4, optimizer=partial(torch.optim.SGD, lr=0.2), lr_scheduler=None, attack="none"
    )
    (group,) = module.configure_optimizers().param_groups
    assert group["lr"] == 0.2 and len(group["params"]) == len(list(module.parameters()))
    assert module.weights_init == {"weights": None, "kind": "scratch", "sha256": None, "classes": None, "fresh": []}


def test_train_cli_fine_tunes_a_checkpoint_with_a_smaller_backbone_lr(digits_cnn_ckpt, tmp_path):
    args = tiny_fit_args(
        tmp_path,
        "--model.arch",
        "digits_cnn",
        "--model.weights",
        str(digits_cnn_ckpt),
        "--model.backbone_lr_scale",
        "0.1",
        "--model.optimizer.lr",
        "0.05",
    )
    cli = train.main(args)
    assert cli.trainer.global_step == 1
    opt = cli.trainer.optimizers[0]
    assert [g["name"] for g in opt.param_groups] == ["backbone", "head"]
    assert [g["max_lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.05])  # OneCycle peaks per group
    init = load_model(cli.trainer.checkpoint_callback.best_model_path).card.training.init
    assert init == {
        "weights": str(digits_cnn_ckpt),
        "kind": "checkpoint",
        "sha256": sha256(digits_cnn_ckpt),
        "classes": 10,
        "fresh": [],
    }
