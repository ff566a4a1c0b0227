"""Robustness report: real checkpoint, real digits and CIFAR-10 images; honest figures, files, identity, errors."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import clean_accuracy
from PIL import Image

from robust import load_model
from robust.data.eval_data import eval_data
from robust.data.images import png_bytes
from robust.data.modules import CIFAR10_NAMES, Digits
from robust.errors import RobustError
from robust.evaluation.render import honesty_flags, markdown_table
from robust.evaluation.report import evaluate
from robust.models.card import ModelCard, TrainingRecord
from robust.threats import AUTOATTACK_THREATS, DEFAULT_THREATS, WORST_CASES, ThreatSpec

EPS = (0.015, 0.03)  # the small digits CNN: PGD leaves about a third, then none
ROOT = Path(__file__).resolve().parents[1]


def cli_main(argv: list[str]) -> int:
    """``evaluate.py``'s ``main`` (the CLI lives beside the package, not in it)."""
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.main(argv)


@pytest.fixture(scope="module")
def report_dir(digits_cnn_ckpt, tmp_path_factory):
    """``evaluate.py report`` run in-process on 64 digits val images of the clean-trained CNN checkpoint."""
    out = tmp_path_factory.mktemp("report")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli_main(
            [
                "report",
                "--checkpoint",
                str(digits_cnn_ckpt),
                "--data",
                "digits",
                "--eps",
                *map(str, EPS),
                "--limit",
                "64",
                "--steps",
                "5",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
    assert code == 0
    return out, stdout.getvalue()


@pytest.fixture(scope="module")
def report(report_dir):
    return json.loads((report_dir[0] / "report.json").read_text())


def test_every_default_threat_is_measured_at_every_eps(report, digits_cnn_ckpt):
    assert [row["eps"] for row in report["rows"]] == list(EPS)
    clean = clean_accuracy(load_model(digits_cnn_ckpt), "digits", 64)
    for row in report["rows"]:
        assert set(DEFAULT_THREATS) <= row.keys() and not set(AUTOATTACK_THREATS) & row.keys()
        assert row["clean"] == clean  # the checkpoint's own accuracy on the 64 reported images
        assert row["alpha"] == pytest.approx(row["eps"] / 4)


def test_figures_are_those_of_a_clean_trained_model(report):
    low, high = report["rows"]
    assert low["clean"] >= 0.85 and low["clean"] == high["clean"] and low["jpeg"] == high["jpeg"]
    for row in report["rows"]:
        assert row["pgd"] <= row["fgsm"] + 0.02  # multi-step is at least as strong as one step
        assert row["bpda_pgd"] <= row["jpeg_pgd"] + 0.02  # the adaptive attack beats the transferred one
        assert row["pgd"] < row["clean"] - 0.3  # clean training gives little robustness
    assert high["pgd"] <= low["pgd"] and high["targeted_success"] >= low["targeted_success"]
    # the report's flags are those of its rows, judged at its own sample size (a gap within its noise is no flag)
    assert report["flags"] == honesty_flags(report["rows"], report["n"], report["norm"], report["mode"] == "cascade")


def test_worst_cases_are_no_better_than_any_of_their_parts(report):
    for row in report["rows"]:
        for key in WORST_CASES:
            if key in row:  # aa_worst comes with AutoAttack only
                parts = ThreatSpec(row["eps"], square_queries=report["square_queries"]).parts(key)
                assert row[key] <= min(row[p] for p in parts)


def test_report_records_setup_and_identity(report, digits_cnn_ckpt):
    assert (report["n"], report["steps"], report["restarts"], report["quality"], report["seed"]) == (64, 5, 1, 75, 0)
    assert report["eps"] == list(EPS) and report["alpha"] is None and report["autoattack"] is False
    model = report["model"]
    assert model["sha256"] == hashlib.sha256(digits_cnn_ckpt.read_bytes()).hexdigest()
    assert model["path"] == str(digits_cnn_ckpt.resolve()) and model["arch"] == "digits_cnn"
    assert model["card"]["class_names"] == [str(i) for i in range(10)] and model["card"]["image_size"] == 32
    assert report["data"] == {
        "name": "digits",
        "split": "val",
        "split_seed": 0,
        "labels": "by name",
        "limit": 64,
        "n": 64,
    }


def test_report_files_are_valid_and_consistent(report_dir, report):
    out, stdout = report_dir
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "robustness_curve.png"]
    markdown = (out / "report.md").read_text()
    assert markdown == markdown_table(report)  # the JSON round-trips to the same table
    assert markdown in stdout  # the table is printed too
    assert markdown.startswith("# Robustness of `")
    tables = [block.splitlines() for block in markdown.split("\n\n") if block.startswith("| ε")]
    assert len(tables) == 2  # what to claim, then per attack
    header, rule, *rows = tables[1]
    # eps and every threat but AutoAttack's (not run) and the summary's three (clean, the two worst cases), in bars
    assert header.count("|") == rule.count("|") == (len(DEFAULT_THREATS) - 3) + 2
    for line, row in zip(rows, report["rows"], strict=True):
        assert f"| {100 * row['pgd']:.1f} |" in line and line.startswith(f"| {row['eps']:.4g}")
    with Image.open(out / "robustness_curve.png") as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 400


def test_honesty_flags():
    ok = {"eps": 0.1, "pgd": 0.2, "fgsm": 0.3, "pgd_worst": 0.15, "jpeg_pgd": 0.5, "bpda_pgd": 0.4, "jpeg_worst": 0.35}
    assert honesty_flags([ok]) == []
    masked = honesty_flags([{**ok, "pgd": 0.35}])
    assert len(masked) == 1 and "gradient masking" in masked[0] and "pgd_worst 15.00%" in masked[0]
    weak = honesty_flags([{**ok, "bpda_pgd": 0.6}])
    assert len(weak) == 1 and "bpda_pgd" in weak[0] and "jpeg_worst 35.00%" in weak[0]
    assert honesty_flags([{**ok, "autoattack": 0.15}]) == []
    above = honesty_flags([{**ok, "autoattack": 0.1}])
    assert len(above) == 1 and "5.0 points above AutoAttack" in above[0]
    table = markdown_table(
        {
            "rows": [
                {
                    **ok,
                    "clean": 0.9,
                    "jpeg": 0.8,
                    "jpeg_fgsm": 0.5,
                    "bpda_pgd": 0.6,
                    "targeted_success": 0.1,
                    "alpha": 0.025,
                }
            ],
            "flags": weak,
            "n": 1,
            "steps": 10,
            "restarts": 1,
            "quality": 75,
            "seed": 0,
        }
    )
    assert "**Warning:**" in table


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """Digits val images written as PNG into a class-folder tree ``<digit>/<i>.png`` (3 per class)."""
    root = tmp_path_factory.mktemp("digit_folder")
    dm = Digits()
    dm.setup()
    x, y = dm.val_set.tensors
    for label in range(10):
        (root / str(label)).mkdir()
        for i, idx in enumerate((y == label).nonzero()[:3, 0]):
            (root / str(label) / f"{i}.png").write_bytes(png_bytes(x[idx]))
    return root


def test_image_folder_data(digits_folder, digits_cnn_ckpt):
    model = load_model(digits_cnn_ckpt)
    loader, identity = eval_data(str(digits_folder), model.card, batch_size=16)
    assert identity["name"] == "folder" and identity["n"] == 30 and identity["labels"] == "by name"
    assert len(identity["fingerprint"]) == 64
    results = evaluate(model, loader, [0.1], steps=2, progress=False)
    assert results["n"] == 30 and results["rows"][0]["clean"] >= 0.8
    # The same classes in another order are matched by name.
    card = dataclasses.replace(model.card, class_names=[str(i) for i in reversed(range(10))])
    loader, identity = eval_data(str(digits_folder), card, batch_size=30)
    assert identity["labels"] == "by name (reordered)"
    _, y = next(iter(loader))
    assert y.tolist() == [9 - i // 3 for i in range(30)]


def test_data_with_other_classes_is_a_clear_error(digits_cnn_ckpt, shared_data):
    card = load_model(digits_cnn_ckpt).card
    with pytest.raises(RobustError, match="not the model's 10 classes"):
        eval_data(str(shared_data / "cifar10-subset" / "test"), card)
    with pytest.raises(RobustError, match="none of these"):
        eval_data(str(shared_data / "no-such-folder"), card)


def test_cifar10_subset_folder_with_a_cifar_card(shared_data):
    card = ModelCard(
        arch="resnet18",
        num_classes=10,
        class_names=list(CIFAR10_NAMES),
        image_size=32,
        resize=32,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        cifar_stem=True,
        data="CIFAR10",
        training=TrainingRecord(),
    )
    loader, identity = eval_data(str(shared_data / "cifar10-subset" / "test"), card, limit=20, batch_size=20)
    x, y = next(iter(loader))
    assert x.shape == (20, 3, 32, 32) and identity["n"] == 20 and identity["classes"] == card.class_names
    assert sorted(set(y.tolist())) == list(range(10))  # evenly spaced: every class represented


def test_nan_images_are_a_clear_error(digits_cnn):
    x = torch.rand(4, 3, 32, 32)
    x[2, 1, 5, 5] = float("nan")
    with pytest.raises(RobustError, match="NaN"):
        evaluate(digits_cnn, [(x, torch.zeros(4, dtype=torch.int64))], [0.1], progress=False)


@pytest.mark.slow  # torchattacks' AutoAttack (FAB-T, Square): in make test-all
def test_autoattack_is_no_weaker_than_pgd(digits_cnn, digits_val):
    x, y = digits_val
    results = evaluate(digits_cnn, [(x[:8], y[:8])], [0.015], steps=10, autoattack=True, progress=False)
    row = results["rows"][0]
    assert 0.0 <= row["autoattack"] <= row["pgd"] + 1 / 8
    assert row["aa_worst"] <= min(row["pgd_worst"], row["autoattack"])  # the per-example worst of all of them
    assert any("above AutoAttack" in flag for flag in results["flags"]) is (row["pgd_worst"] > row["autoattack"])


def test_exported_model_reports_the_same_figures(digits_cnn_ckpt, tmp_path):
    assert cli_main(["export", "--checkpoint", str(digits_cnn_ckpt), "--out", str(tmp_path / "export")]) == 0
    reports = {}
    for name, spec in (("ckpt", digits_cnn_ckpt), ("export", tmp_path / "export")):
        out = tmp_path / name
        with contextlib.redirect_stdout(io.StringIO()):
            assert (
                cli_main(
                    [
                        "report",
                        "--model",
                        str(spec),
                        "--data",
                        "digits",
                        "--eps",
                        "8/255",
                        "--limit",
                        "16",
                        "--steps",
                        "2",
                        "--out",
                        str(out),
                        "--device",
                        "cpu",
                    ]
                )
                == 0
            )
        reports[name] = json.loads((out / "report.json").read_text())
    assert reports["ckpt"]["rows"] == reports["export"]["rows"]
    assert reports["ckpt"]["rows"][0]["eps"] == 8 / 255
    assert len(reports["export"]["model"]["sha256"]) == 64 and reports["export"]["model"]["path"].endswith("export")
