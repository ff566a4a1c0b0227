"""``experiments/mnist.py`` and ``experiments/mnist_control.py`` end to end on tiny runs over the real MNIST files:
rows trained and measured by the report, the table written, its hand-written Reading kept on a rerun."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments import mnist, mnist_control


def _check_figures(row: dict) -> None:
    figures = row["figures"]
    assert all(0.0 <= figures[k] <= 1.0 for k in ("clean", "pgd", "apgd"))
    # clean-wrong images count as wrong under every attack: no attack figure can exceed the clean one
    assert figures["pgd"] <= figures["clean"] and figures["apgd"] <= figures["clean"]


@pytest.mark.slow  # two batches of each recipe (FGSM-RS, PGD-40), then PGD-50×10 and APGD-100 on 20 test digits
@pytest.mark.shared_data
def test_a_tiny_reproduction_writes_the_table_and_keeps_its_reading(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUST_DATA", str(shared_data))
    argv = [
        "--seeds",
        "0",
        "--heldout-seeds",
        "1",
        "--val-size",
        "200",
        "--pgd-epochs",
        "1",
        "--no-authors",
        "--no-autoattack",
        "--limit",
        "20",
        "--threads",
        "1",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
        "--train-args",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
    ]
    doc = mnist.main(argv)
    names = ["fgsm_seed0", "fgsm_heldout_seed1", "fgsm_heldout_seed1_best", "pgd_1ep"]  # no authors' rows offline
    assert [r["name"] for r in doc["rows"]] == names
    for row in doc["rows"]:
        _check_figures(row)
        assert row["n"] == 20
    last, best = doc["rows"][1:3]
    assert Path(best["checkpoint"]).name.startswith("best-") and last["checkpoint"].endswith("last.ckpt")
    assert doc["heldout_best_mean"]["figures"] == best["figures"] and doc["heldout_mean"]["seeds"] == [1]
    page = tmp_path / "out" / "mnist.md"
    text = page.read_text()
    held = "| ours FGSM-RS, 200 training images held out: most robust epoch by held-out val, mean of 1 (range) |"
    assert held in text
    assert "| ours FGSM-RS, seed 0 |" in text and "| ours PGD-40, 1 of 100 epochs |" in text
    assert "python experiments/mnist.py --seeds 0 --heldout-seeds 1 --val-size 200" in text
    page.write_text(text + "\n## Reading\n\nOnly a smoke run.\n")
    again = mnist.main(argv)  # every row kept in --work: nothing trained or measured twice
    assert again["rows"] == doc["rows"]
    assert page.read_text().rstrip().endswith("## Reading\n\nOnly a smoke run.")
    # Another limit measures again: a kept row never stands in for a measurement on other images.
    other = mnist.main(
        [
            "--seeds",
            "0",
            "--heldout-seeds",
            "--pgd-epochs",
            "0",
            "--no-authors",
            "--no-autoattack",
            "--limit",
            "12",
            *argv[argv.index("--threads") :],
        ]
    )
    assert [r["name"] for r in other["rows"]] == ["fgsm_seed0"] and other["rows"][0]["n"] == 12
    # AutoAttack on every image the protocol measures: its one report gives the protocol's figures too
    both = mnist.main(
        [
            "--seeds",
            "0",
            "--heldout-seeds",
            "--pgd-epochs",
            "0",
            "--no-authors",
            "--limit",
            "12",
            "--aa-limit",
            "12",
            *argv[argv.index("--threads") :],
        ]
    )
    (row,) = both["rows"]
    assert row["n"] == row["aa_n"] == 12 and len(row["reports"]) == 1 and "autoattack-limit12" in row["reports"][0]
    _check_figures(row)
    assert row["figures"]["worst"] <= min(row["figures"]["autoattack"], row["figures"]["aa_pgd_worst"])
    assert "† on all test images" in page.read_text()


@pytest.mark.slow  # one epoch of three batches in the plain loop, then the report on 20 test digits
@pytest.mark.shared_data
def test_the_plain_loop_control_trains_and_is_measured_by_the_report(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUST_DATA", str(shared_data))
    doc = mnist_control.main(
        [
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--limit-train-batches",
            "3",
            "--limit",
            "20",
            "--threads",
            "1",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path),
        ]
    )
    (row,) = doc["rows"]
    assert row["seed"] == 1 and row["n"] == 20
    _check_figures(row)
    assert "| 1 |" in (tmp_path / "mnist_control.md").read_text()


@pytest.mark.parametrize("bad", [["--epochs", "0"], ["--limit-train-batches", "0"]])
def test_bad_control_arguments_stop_before_training(bad, capsys):
    with pytest.raises(SystemExit) as stop:
        mnist_control.main(bad)
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err
