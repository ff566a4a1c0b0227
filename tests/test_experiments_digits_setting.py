"""``experiments/digits_setting.py`` end to end on a tiny setting: one row per setting, the robust run trained
adversarially and its twin clean from the same config, each figure an accuracy, the worst case no better than PGD."""

from __future__ import annotations

import pytest
import yaml

from experiments import digits_setting


@pytest.mark.slow  # two 2-batch trainings at 8×8 and the threat suite on 360 digits: about a minute on 2 cores
def test_one_tiny_setting_gives_a_row_for_the_robust_run_and_its_clean_twin(tmp_path, capsys):
    rows = digits_setting.main(
        [
            "--sizes",
            "8",
            "--epochs",
            "1",
            "--stem",
            "imagenet",
            "--limit-train-batches",
            "2",
            "--eps",
            "0.2",
            "--twin-eps",
            "0.1",
            "0.3",
            "--out",
            str(tmp_path),
        ]
    )
    assert len(rows) == 1
    (row,) = rows
    assert (row["stem"], row["size"], row["epochs"], row["eps"]) == ("imagenet", 8, 1, 0.2)
    figures = [row["robust_clean"], row["robust_pgd"], row["robust_pgd_worst"], row["twin_clean"]]
    assert all(0.0 <= f <= 1.0 for f in [*figures, *row["twin_pgd"].values()])
    assert list(row["twin_pgd"]) == ["0.1", "0.3"]
    assert row["robust_pgd_worst"] <= row["robust_pgd"]  # correct only where PGD (and FGSM and APGD) are
    trained = {}
    for run in ("adv", "clean"):  # what train.py ran, saved by LightningCLI
        (config,) = (tmp_path / f"imagenet-8px-1ep-{run}").rglob("config.yaml")
        trained[run] = yaml.safe_load(config.read_text())["model"]
    assert (trained["adv"]["adv_ratio"], trained["clean"]["adv_ratio"]) == (1.0, 0.0)
    assert trained["adv"]["eps"] == trained["clean"]["eps"] == 0.2
    assert trained["adv"]["attack"] == trained["clean"]["attack"] == "fgsm_rs"  # the config's recipe
    assert trained["adv"]["cifar_stem"] is trained["clean"]["cifar_stem"] is False  # --stem imagenet
    out = capsys.readouterr().out
    assert out.count("ROW ") == 1 and "| imagenet | 8 | 1 |" in out
