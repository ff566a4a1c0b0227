"""``experiments/collapse.py`` end to end on a tiny run: one row per seed, the guard's probe at every epoch trained,
the kept checkpoint measured on the held-out digits, and arguments checked before any training."""

from __future__ import annotations

import pytest
import yaml

from experiments import collapse


@pytest.mark.slow  # two epochs of two batches at 16×16, then PGD-10 and FGSM on the 360 held-out digits: ~1 min
def test_one_tiny_run_gives_a_row_with_the_guards_trajectory_and_the_kept_figures(tmp_path, capsys):
    rows = collapse.main(
        [
            "--seeds",
            "3",
            "--epochs",
            "2",
            "--limit-train-batches",
            "2",
            "--attack",
            "nfgsm",
            "--threads",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    (row,) = rows
    assert (row["seed"], row["attack"], row["epochs_run"]) == (3, "nfgsm", 2)
    assert len(row["probe_pgd_by_epoch"]) == 2  # the guard watched N-FGSM too (force)
    assert all(0.0 <= f <= 1.0 for f in (*row["probe_pgd_by_epoch"], row["kept_pgd"], row["kept_fgsm"]))
    assert (row["flagged_epoch"] is None) == (row["collapsed_pgd"] is None)
    (config,) = (tmp_path / "nfgsm" / "seed3").rglob("config.yaml")  # what train.py ran, saved by LightningCLI
    ran = yaml.safe_load(config.read_text())
    assert (ran["model"]["attack"], ran["model"]["eps"], ran["data"]["init_args"]["image_size"]) == ("nfgsm", 0.2, 16)
    assert (ran["overfit_guard"]["action"], ran["overfit_guard"]["force"]) == ("stop", True)
    out = capsys.readouterr().out
    assert out.count("ROW ") == 1 and "| 3 |" in out


@pytest.mark.parametrize("bad", [["--epochs", "0"], ["--eps", "2"], ["--min-drop", "0"], ["--threads", "0"]])
def test_bad_arguments_stop_before_training(bad, capsys):
    with pytest.raises(SystemExit) as stop:
        collapse.main(bad)
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err
