"""The L2 threat model end to end: a model trained a few steps under L2 carries its norm in the card, its TensorBoard
tags and its report; a report in L2 of an L∞-trained model says so; bad L2 input is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import evaluate_in_process, tiny_fit_args

import train
from robust import load_model
from robust.training.module import val_tag

ROOT = Path(__file__).resolve().parents[1]
L2 = [
    "--model.norm",
    "l2",
    "--model.eps",
    "1.0",
    "--model.attack",
    "pgd",
    "--model.attack_steps",
    "2",
    "--model.channels_last",
    "false",
]


def evaluate(*args: str) -> subprocess.CompletedProcess:
    """``evaluate.py`` in this process (conftest's evaluate_in_process says where the real-process path is tested)."""
    return evaluate_in_process(*args)


@pytest.fixture(scope="module")
def l2_run(tmp_path_factory) -> tuple[Path, object]:
    cli = train.main([*tiny_fit_args(tmp_path_factory.mktemp("l2"), *L2), "--trainer.limit_train_batches", "3"])
    return Path(cli.trainer.checkpoint_callback.best_model_path), cli


def test_an_l2_run_keeps_its_norm_everywhere(l2_run):
    path, cli = l2_run
    assert cli.trainer.checkpoint_callback.monitor == val_tag("pgd_worst", "l2") == "val/l2/pgd_worst"
    assert "val/l2/pgd_worst" in cli.trainer.callback_metrics and "val/pgd_worst" not in cli.trainer.callback_metrics
    card = load_model(path).card
    assert card.training.norm == "l2" and card.robustness.norm == "l2" and card.training.eps == 1.0
    assert card.training.alpha == pytest.approx(1.25)  # the registry's L2 PGD step 2.5·eps/steps, 2 steps
    assert "l2/pgd_worst" in card.robustness.metrics


def test_the_report_of_an_l2_model_is_in_l2(l2_run, tmp_path):
    path, _ = l2_run
    proc = evaluate(
        "report",
        "--model",
        str(path),
        "--data",
        "digits",
        "--limit",
        "16",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "r"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["norm"] == "l2" and report["eps"] == [1.0]  # the model's own norm and eps by default
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "L2 attacks at ε 1" in markdown.splitlines()[0] and "| ε (L2) |" in markdown and "/255" not in markdown


def test_an_l2_report_of_an_linf_model_says_so(digits_cnn_ckpt, tmp_path):
    proc = evaluate(
        "report",
        "--model",
        str(digits_cnn_ckpt),
        "--data",
        "digits",
        "--norm",
        "l2",
        "--eps",
        "128/255",
        "0.5",
        "--limit",
        "16",
        "--steps",
        "2",
        "--threats",
        "clean",
        "pgd",
        "--out",
        str(tmp_path / "r"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    title = (tmp_path / "r" / "report.md").read_text().splitlines()[0]
    assert "L2 attacks at ε 0.5, 0.502" in title and "(a model trained in L∞)" in title
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    assert all(0 <= row["pgd"] <= row["clean"] for row in rows)  # early exit: an attack never adds a correct image


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--norm", "l3", "--eps", "1"], "invalid choice: 'l3'"),
        (["--norm", "l2", "--eps=-0.5"], "must be"),
        (["--norm", "l2", "--eps", "56"], "above 55.43 = sqrt(C·H·W) for 3072 values per image"),
        (["--norm", "l2"], "the model was trained in linf: give --eps for its l2 evaluation"),
    ],
)
def test_bad_l2_input_is_one_line(digits_cnn_ckpt, tmp_path, args, message):
    proc = evaluate("report", "--model", str(digits_cnn_ckpt), "--data", "digits", *args, "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr and not (tmp_path / "r").exists()


def test_fool_in_l2_stays_inside_the_ball(l2_run, tmp_path):
    path, _ = l2_run
    from robust.data.modules import Digits
    from robust.evaluation.fool import fool

    model = load_model(path)
    dm = Digits(image_size=model.card.image_size)
    dm.setup()
    x = dm.val_set.tensors[0][:1]
    result = fool(model, x, eps=0.5, steps=5, norm="l2")
    assert float((result.x_adv - result.x).flatten().norm()) <= 0.5 + 1e-6
    levels = result.x_adv * 255
    assert (levels - levels.round()).abs().max() < 1e-4  # on the uint8 grid the PNG holds


@pytest.mark.shared_data
def test_the_cifar10_l2_config_trains_on_the_shared_subset(shared_data, tmp_path):
    cli = train.main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "cifar10_l2.yaml"),
            "--data",
            "robust.data.modules.ImageFolder",
            "--data.init_args.root",
            str(shared_data / "cifar10-subset"),
            "--data.init_args.batch_size",
            "4",
            "--data.init_args.num_workers",
            "0",
            "--data.init_args.limit",
            "8",
            "--data.init_args.image_size",
            "8",  # a sixteenth of the PreAct ResNet-18's cost at 32×32; the config, not the size, is under test
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.precision",
            "32-true",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.num_sanity_val_steps",
            "0",  # the validation below runs the same threat suite
            "--model.val_steps",
            "1",
            "--image_grid.n",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--overfit_guard.n",
            "4",
            "--overfit_guard.pgd_steps",
            "1",
        ]
    )
    card = load_model(cli.trainer.checkpoint_callback.best_model_path).card
    assert (card.arch, card.training.norm, card.training.eps, card.training.attack_steps) == (
        "preact_resnet18",
        "l2",
        0.5,
        7,
    )
    assert card.training.alpha == pytest.approx(2.5 * 0.5 / 7)
