"""Grayscale end to end: a 1-channel model trains, validates, reports, fools (grayscale PNG in and out), is
JPEG-defended and exported (safetensors, torch.export, ONNX) like an RGB one; a colour image for it is one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import evaluate_in_process, tiny_fit_args
from PIL import Image

import train
from robust import load_model
from robust.data.modules import MNIST, Digits
from robust.defenses import jpeg
from robust.errors import RobustError
from robust.export.folder import export_model
from robust.threats import ThreatSpec, accuracy

ROOT = Path(__file__).resolve().parents[1]

GREY = [
    "--data.init_args.channels",
    "1",
    "--data.init_args.image_size",
    "28",
    "--model.arch",
    "mnist_net",
    "--model.cifar_stem",
    "false",
    "--model.mean",
    "[0.0]",
    "--model.std",
    "[1.0]",
    "--model.eps",
    "0.3",
    "--model.channels_last",
    "false",
]


def evaluate(*args: str) -> subprocess.CompletedProcess:
    """``evaluate.py`` in this process (conftest's evaluate_in_process says where the real-process path is tested)."""
    return evaluate_in_process(*args)


@pytest.fixture(scope="module")
def grey_ckpt(tmp_path_factory) -> Path:
    """mnist_net trained on grayscale 28×28 digits by train.py for 40 steps of FGSM-RS at eps 0.3, validated once."""
    save = tmp_path_factory.mktemp("grey")
    cli = train.main(
        [
            *tiny_fit_args(save, *GREY),
            "--trainer.limit_train_batches",
            "40",
            "--data.init_args.batch_size",
            "32",
            "--trainer.limit_val_batches",
            "2",
        ]
    )
    assert cli.model.model.normalize.mean.shape == (1, 1, 1, 1)
    return Path(cli.trainer.checkpoint_callback.best_model_path)


def test_a_grayscale_model_trains_and_validates_with_its_card(grey_ckpt):
    model = load_model(grey_ckpt)
    card = model.card
    assert (card.arch, card.channels, card.image_size, card.mean, card.std) == ("mnist_net", 1, 28, [0.0], [1.0])
    assert 0 <= card.robustness.metrics["jpeg_worst"] <= 1 and "clean" in card.robustness.metrics
    assert card.robustness.global_step == 40 and card.training.eps == 0.3
    dm = Digits(channels=1, image_size=28)
    dm.setup()
    x, _ = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        assert x.shape[1] == 1 and model(x).shape == (len(x), 10)


def test_report_and_jpeg_on_grayscale(grey_ckpt, tmp_path):
    model = load_model(grey_ckpt)
    dm = Digits(channels=1, image_size=28, limit=64)
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    assert jpeg(x, 75).shape == x.shape  # torchvision.io encodes 1-channel JPEG
    figures = accuracy(model, x, y, ThreatSpec(eps=0.3, steps=5))
    assert all(0 <= value <= 1 for value in figures.values()) and figures["pgd_worst"] <= figures["pgd"]
    proc = evaluate(
        "report",
        "--model",
        str(grey_ckpt),
        "--data",
        "digits",
        "--limit",
        "32",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "r"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "r" / "report.json").is_file()


def test_fool_takes_and_writes_grayscale_png(grey_ckpt, tmp_path):
    dm = Digits(channels=1, image_size=28)
    dm.setup()
    digit = (dm.val_set[0][0][0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(digit, mode="L").save(tmp_path / "digit.png")
    proc = evaluate(
        "fool",
        "--model",
        str(grey_ckpt),
        "--image",
        str(tmp_path / "digit.png"),
        "--eps",
        "0.3",
        "--out",
        str(tmp_path / "fool"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(tmp_path / "fool" / "adversarial.png") as out:
        assert out.mode == "L" and out.size == (28, 28)
    Image.fromarray(np.stack([digit, digit // 2, digit], axis=-1), mode="RGB").save(tmp_path / "colour.png")
    proc = evaluate(
        "fool", "--model", str(grey_ckpt), "--image", str(tmp_path / "colour.png"), "--out", str(tmp_path / "no")
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "grayscale (1-channel)" in proc.stderr
    assert not (tmp_path / "no").exists()


def test_channel_mismatch_is_one_line(grey_ckpt):
    model = load_model(grey_ckpt)
    with pytest.raises(RobustError, match=r"the images have 3 channel\(s\) \(RGB\); the model takes 1 \(grayscale\)"):
        model(torch.rand(2, 3, 28, 28))


def test_grayscale_export_round_trip_is_bit_identical(grey_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    folder = export_model(grey_ckpt, tmp_path / "export", torch_export=True, onnx=True)
    original, exported = load_model(grey_ckpt), load_model(folder)
    assert exported.card.onnx["input_shape"] == ["batch", 1, 28, 28]
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(x), exported(x))
        program = torch.export.load(folder / "model.pt2").module()
        assert torch.equal(program(x), original(x))


@pytest.mark.shared_data
def test_mnist_data_module_reads_the_official_files(shared_data):
    dm = MNIST(root=str(shared_data), limit=None)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (60_000, 10_000)
    x, y = dm.val_set[0]
    assert x.shape == (1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1 and int(y) == 7  # MNIST's first
    assert dm.describe()["channels"] == 1 and dm.num_classes == 10


def test_missing_mnist_is_one_line_naming_the_flag(tmp_path):
    with pytest.raises(RobustError, match=r"MNIST is not in .* set --data.init_args.root \(or ROBUST_DATA\)"):
        MNIST(root=str(tmp_path), download=False).setup()
