"""``experiments/mnist_recipes.py`` and ``experiments/guard_probe.py`` end to end on tiny runs over the real MNIST
files: recipes trained and measured by the report, means and minima over seeds, time ratios against the paper's
run; a probe run recorded and turned into a replayable trajectory."""

from __future__ import annotations

import json

import pytest

from experiments import guard_probe, mnist_recipes

TINY = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "1"]


@pytest.mark.slow  # four tiny train.py runs and their reports, each a process
@pytest.mark.shared_data
def test_a_tiny_comparison_writes_means_minima_and_time_ratios(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUST_DATA", str(shared_data))
    argv = ["--recipes", "ema", "--seeds", "0", "1", "--limit", "10", "--work", str(tmp_path / "work")]
    doc = mnist_recipes.main([*argv, "--out", str(tmp_path / "out"), "--train-args", *TINY])
    assert [r["name"] for r in doc["rows"]] == ["paper_seed0", "paper_seed1", "ema_seed0", "ema_seed1"]
    for recipe, summary in doc["summaries"].items():
        rows = [r for r in doc["rows"] if r["recipe"] == recipe]
        for key in ("clean", "pgd", "apgd", "pgd_worst"):
            values = [r["figures"][key] for r in rows]
            assert summary["min"][key] == min(values) and summary["mean"][key] == pytest.approx(sum(values) / 2)
        assert all(r["figures"]["pgd_worst"] <= r["figures"]["pgd"] <= r["figures"]["clean"] for r in rows)
    assert doc["summaries"]["paper"]["time_ratio"] == pytest.approx(1.0)
    page = (tmp_path / "out" / "mnist_recipes.md").read_text()
    assert "| ema: FGSM-RS, EMA of the weights (decay 0.999) | 0 1 |" in page
    again = mnist_recipes.main([*argv, "--out", str(tmp_path / "out"), "--train-args", *TINY])
    assert again["rows"] == doc["rows"]  # every row kept in --work: nothing trained or measured again
    more = ["--recipes", "ema", "guard", "--seeds", "0", "1", "2", "--kept-only"]  # guard and seed 2 never ran
    table = mnist_recipes.main([*argv, *more, "--out", str(tmp_path / "kept")])
    assert table["rows"] == doc["rows"] and set(table["summaries"]) == {"paper", "ema"}


@pytest.mark.slow  # one tiny in-process fit with the probes
@pytest.mark.shared_data
def test_a_probe_run_records_every_check_and_collects_into_a_replayable_trajectory(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUST_DATA", str(shared_data))
    out = tmp_path / "probe"
    argv = ["--seed", "0", "--epochs", "2", "--limit-train-batches", "2", "--probe", "16", "--test", "10"]
    result = guard_probe.main([*argv, "--out", str(out)])
    assert len(result["checks"]) == len(result["guard_history"]) == 3  # the start and two epochs
    assert [c["step"] for c in result["checks"]] == [h["step"] for h in result["guard_history"]] == [0, 2, 4]
    record = guard_probe.main(["--collect", str(out / "fgsm_rs_seed0.json"), "--to", str(tmp_path / "t.json")])
    assert json.loads((tmp_path / "t.json").read_text()) == record
    (run,) = record["runs"]
    assert [c[2] for c in run["checks"]] == [0.0, 0.5, 1.0]
    assert [c[:2] for c in run["checks"]] == [[h["guard/pgd"], h["guard/fgsm"]] for h in result["guard_history"]]
    assert run["collapse_at"] == guard_probe.truth_collapse(
        [{**c, "progress": p} for c, (_, _, p) in zip(result["checks"], run["checks"], strict=True)]
    )
