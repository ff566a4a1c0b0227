"""Export of trained checkpoints (safetensors + model.json [+ torch.export]) and loading them back."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from datetime import datetime
from pathlib import Path

import lightning as L
import pytest
import safetensors.torch
import torch
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint

import robust
from robust.data.modules import DIGIT_NAMES, Digits
from robust.errors import RobustError
from robust.export.folder import export_model
from robust.models.card import ModelCard
from robust.models.resolve import load_model, model_from_checkpoint
from robust.training.module import VAL_KEYS, AdversarialClassifier


def train_checkpoint(folder: Path, cifar_stem: bool, val_batches: int) -> tuple[Path, AdversarialClassifier]:
    """One FGSM-RS step on digits; with validation, the checkpoint train.py's ModelCheckpoint keeps as best by
    ``val/pgd``, else ``trainer.save_checkpoint``."""
    L.seed_everything(0)
    module = AdversarialClassifier(
        num_classes=10,
        class_names=list(DIGIT_NAMES),
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        cifar_stem=cifar_stem,
        eps=0.1,
        val_steps=1,
    )
    best = ModelCheckpoint(dirpath=folder, monitor="val/pgd", mode="max")
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=val_batches,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=[best] if val_batches else [],
        enable_checkpointing=bool(val_batches),
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
    )
    # Small batches: what is checked is the checkpoint's way through export, not its figures; a CIFAR-stem ResNet18
    # costs 16x the torchvision stem's per 32×32 image, and validation runs the whole threat suite on its batch.
    trainer.fit(module, datamodule=Digits(batch_size=8 if cifar_stem else 16))
    if val_batches:
        return Path(best.best_model_path), module.eval()
    trainer.save_checkpoint(folder / "last.ckpt")
    return folder / "last.ckpt", module.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, AdversarialClassifier]:
    return train_checkpoint(tmp_path_factory.mktemp("ckpt"), cifar_stem=False, val_batches=1)


@pytest.fixture(scope="module")
def trained_cifar_stem(tmp_path_factory) -> tuple[Path, AdversarialClassifier]:
    return train_checkpoint(tmp_path_factory.mktemp("ckpt_stem"), cifar_stem=True, val_batches=0)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    return export_model(trained[0], tmp_path_factory.mktemp("exports") / "model")


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """16 real digits validation images, ``16×3×32×32`` in [0, 1]."""
    dm = Digits()
    dm.setup()
    return dm.val_set.tensors[0][:16]


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def clone_export(src: Path, dst: Path, **card_changes) -> Path:
    """A copy of an export (weights hard-linked) with some model.json fields changed: a value replaces the
    field, ``None`` deletes it, a function maps the old value to the new one."""
    dst.mkdir()
    os.link(src / "model.safetensors", dst / "model.safetensors")
    card = json.loads((src / "model.json").read_text())
    for key, value in card_changes.items():
        if value is None:
            del card[key]
        elif callable(value):
            card[key] = value(card[key])
        else:
            card[key] = value
    (dst / "model.json").write_text(json.dumps(card))
    return dst


def test_export_and_reload_give_bit_identical_logits(trained, exported, batch):
    ckpt, module = trained
    assert sorted(p.name for p in exported.iterdir()) == ["model.json", "model.safetensors"]
    assert [p.name for p in exported.parent.iterdir()] == ["model"]  # no temp folders left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in exported.iterdir()} == {oct(0o666 & ~umask)}
    expected = logits(module, batch)
    for spec in (str(exported), exported / "model.json", exported / "model.safetensors"):
        model = robust.load_model(spec)
        assert not model.training
        assert torch.equal(logits(model, batch), expected)
    assert torch.equal(logits(model_from_checkpoint(ckpt), batch), expected)
    state = safetensors.torch.load_file(exported / "model.safetensors")
    assert torch.equal(state["normalize.mean"], torch.full((1, 3, 1, 1), 0.5))
    assert set(state) == set(module.model.state_dict())


def test_model_card_has_every_documented_field(trained, exported):
    card = json.loads((exported / "model.json").read_text())
    assert list(card) == list(ModelCard.schema())
    assert (card["format"], card["format_version"]) == ("robust-export", 1)
    assert (card["arch"], card["num_classes"], card["class_names"]) == ("resnet18", 10, list(DIGIT_NAMES))
    assert (card["image_size"], card["resize"], card["cifar_stem"], card["data"]) == (32, 32, False, "Digits")
    assert card["mean"] == [0.5] * 3 and card["std"] == [0.5] * 3
    assert card["training"] == {
        "attack": "fgsm_rs",
        "switched_from": None,
        "target": "none",
        "norm": "linf",
        "eps": 0.1,
        "alpha": trained[1].alpha,
        "adv_ratio": 1.0,
        "attack_steps": 7,
        "attack_early_exit": False,
        "nfgsm_noise": 2.0,
        "clamp_start": True,
        "objective": "ce",
        "beta": None,
        "ema_decay": None,
        "init": {"weights": None, "kind": "scratch", "sha256": None, "classes": None, "fresh": []},
        "seed": card["training"]["seed"],
        "guard": None,  # the fixture's trainer runs no overfitting guard
        "optimizer": card["training"]["optimizer"],
        "lr_scheduler": card["training"]["lr_scheduler"],
    }
    assert card["training"]["optimizer"]["class"] == "torch.optim.sgd.SGD" and card["channels"] == 3
    assert trained[1].alpha == pytest.approx(0.125)  # the step in force: FGSM-RS's default 1.25·eps
    rob = card["robustness"]
    assert set(VAL_KEYS) <= set(rob["metrics"])
    assert all(0.0 <= rob["metrics"][k] <= 1.0 for k in VAL_KEYS)
    assert (rob["eps"], rob["steps"], rob["jpeg_quality"], rob["epoch"], rob["global_step"]) == (0.1, 1, 75, 0, 1)
    assert rob["best"] == {"monitor": "val/pgd", "score": rob["metrics"]["pgd"]}
    assert card["versions"]["torch"] == torch.__version__
    assert card["versions"]["torchvision"] == torchvision.__version__
    assert card["versions"]["lightning"] == L.__version__
    assert datetime.fromisoformat(card["created"]).utcoffset() is not None
    digest = hashlib.sha256((exported / "model.safetensors").read_bytes()).hexdigest()
    assert card["files"] == {"model.safetensors": digest}
    assert load_model(exported).card.to_dict() == card


def test_torch_export_program_gives_same_logits(trained, batch, tmp_path):
    out = export_model(trained[0], tmp_path / "model", torch_export=True)
    card = json.loads((out / "model.json").read_text())
    assert card["files"]["model.pt2"] == hashlib.sha256((out / "model.pt2").read_bytes()).hexdigest()
    program = torch.export.load(out / "model.pt2").module()
    for x in (batch, batch[:3]):  # the batch dimension is dynamic
        assert torch.equal(logits(program, x), logits(trained[1], x))
    assert torch.equal(logits(load_model(out / "model.pt2"), batch), logits(trained[1], batch))


@pytest.mark.parametrize("fixture", ["trained", "trained_cifar_stem"])
def test_plain_torchvision_one_liner(fixture, request, batch, tmp_path, monkeypatch):
    """The README's recipe: torchvision alone, normalization by the card's mean/std, cifar_stem swap."""
    ckpt, module = request.getfixturevalue(fixture)
    batch = batch[:4]  # bit-identical logits on a few images: a CIFAR-stem ResNet18 costs 16x per 32×32 image
    folder = export_model(ckpt, tmp_path / "model")
    card = json.loads((folder / "model.json").read_text())
    monkeypatch.chdir(tmp_path)  # the recipe uses the relative path model/model.safetensors
    # --- README recipe ---
    m = torchvision.models.resnet18(num_classes=card["num_classes"])
    if card["cifar_stem"]:
        m.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        m.maxpool = torch.nn.Identity()
    weights = safetensors.torch.load_file("model/model.safetensors")
    m.load_state_dict({k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")})
    m.eval()
    mean, std = torch.tensor(card["mean"]).view(1, 3, 1, 1), torch.tensor(card["std"]).view(1, 3, 1, 1)
    plain = logits(m, (batch - mean) / std)
    # --- end recipe ---
    assert card["cifar_stem"] == (fixture == "trained_cifar_stem")
    assert torch.equal(plain, logits(load_model(folder), batch))
    assert torch.equal(plain, logits(module, batch))


def test_malicious_pickle_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "hyper_parameters": Payload()}, ckpt)
    with pytest.raises(RobustError, match="pickled objects"):
        load_model(ckpt)
    with pytest.raises(RobustError, match="pickled objects"):
        export_model(ckpt, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    torch.load(ckpt, weights_only=False)  # control: an unsafe load really runs the payload
    assert marker.exists()


def test_bad_checkpoints_raise_robust_error(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(4096))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, foreign)
    for path, message in [
        (garbage, "garbage.ckpt"),
        (tmp_path / "missing.ckpt", "does not exist"),
        (foreign, "not a checkpoint of"),
    ]:
        with pytest.raises(RobustError, match=message):
            export_model(path, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    with pytest.raises(RobustError, match="not found"):
        load_model(tmp_path / "missing.ckpt")
    with pytest.raises(RobustError, match="garbage.ckpt"):
        load_model(garbage)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arch": None}, "no 'arch' field"),
        ({"num_classes": "10"}, "'num_classes' must be int"),
        ({"cifar_stem": 1}, "'cifar_stem' must be bool"),
        ({"mean": ["0.5", "0.5", "0.5"]}, "'mean' must be list"),
        ({"format_version": 2}, "version 2"),
        ({"notes": "hi"}, r"unknown fields \['notes'\]"),
        ({"class_names": ["a", "b"]}, "2 class names for 10 classes"),
        ({"mean": [0.4, 0.5, 0.5]}, "different mean"),
        ({"num_classes": 5, "class_names": list("abcde")}, r"backbone\.fc\.weight has shape \(10, 512\)"),
        ({"files": {}}, "no sha256 for model.safetensors"),
        ({"files": lambda files: {**files, "model.pt2": "0" * 64}}, "model.pt2 is listed"),
    ],
)
def test_invalid_model_card_is_refused(exported, tmp_path, changes, message):
    with pytest.raises(RobustError, match=message):
        load_model(clone_export(exported, tmp_path / "model", **changes))


def test_tampered_or_broken_export_is_refused(exported, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(exported, tampered)
    data = bytearray((tampered / "model.safetensors").read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    (tampered / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(RobustError, match="does not match the sha256"):
        load_model(tampered)
    (tampered / "model.json").write_text("{not json")
    with pytest.raises(RobustError, match="not valid JSON"):
        load_model(tampered)
    (tampered / "model.json").unlink()
    with pytest.raises(RobustError, match="not an export folder"):
        load_model(tampered)


def test_export_replaces_exports_only_and_is_all_or_nothing(trained, exported, tmp_path, monkeypatch):
    out = tmp_path / "model"
    shutil.copytree(exported, out)
    before = (out / "model.json").read_text()

    def crash(*args) -> None:
        raise RuntimeError("crash")

    monkeypatch.setattr("robust.export.folder._torch_export", crash)
    with pytest.raises(RuntimeError, match="crash"):
        export_model(trained[0], out, torch_export=True)
    assert (out / "model.json").read_text() == before  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # and no temp folder is left
    monkeypatch.undo()
    export_model(trained[0], out)
    assert load_model(out).card.files == json.loads(before)["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(RobustError, match="not an export"):
        export_model(trained[0], other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
