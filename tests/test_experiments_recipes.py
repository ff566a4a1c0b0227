"""``experiments/recipes.py``: each row's train.py arguments mean what its docstring says (checked on the module and
trainer train.py builds from them, without training), the results file, and one tiny end-to-end run (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from experiments import recipes
from robust.averaging import weight_averages
from robust.errors import RobustError
from robust.guard import CatastrophicOverfittingGuard

ROOT = Path(__file__).resolve().parents[1]
E8, E16 = 8 / 255, 16 / 255
# Per row, written out from the papers (recipes.py's docstring): attack, objective, eps, training step, PGD steps,
# beta, N-FGSM noise (times eps).
PAPERS = {
    "fgsm_rs": ("fgsm_rs", "ce", E8, 10 / 255, None, None, None),  # Wong et al. 2020: 1.25 eps
    "nfgsm": ("nfgsm", "ce", E8, E8, None, None, 2.0),  # de Jorge et al. 2022: noise 2 eps, step eps
    "pgd3": ("pgd", "ce", E8, 2 / 255, 3, None, None),  # Rice et al. 2020's step, 3 steps
    "trades": ("pgd", "trades", E8, 0.007 / 0.031 * E8, 10, 6.0, None),  # train_trades_cifar10.py
    "mart": ("pgd", "mart", E8, 0.007 / 0.031 * E8, 10, 5.0, None),  # MART train_resnet.py
    "finetune": ("fgsm_rs", "ce", E8, 10 / 255, None, None, None),
    "fgsm_rs_eps16": ("fgsm_rs", "ce", E16, 20 / 255, None, None, None),
    "nfgsm_eps16": ("nfgsm", "ce", E16, E16, None, None, 2.0),
}


@pytest.fixture(scope="module")
def subset(shared_data) -> str:
    return str(shared_data / "cifar10-subset")


def built(args: list[str]):
    """train.py's CLI for ``args``, built but not fitted."""
    return train.main(args, run=False)


def guard_of(cli) -> CatastrophicOverfittingGuard:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, CatastrophicOverfittingGuard))


def assert_paper_settings(cli, name: str) -> None:
    attack, objective, eps, alpha, steps, beta, noise = PAPERS[name.removesuffix("_ema")]
    module = cli.model
    assert (module.attack, module.hparams.objective) == (attack, objective)
    assert math.isclose(module.hparams.eps, eps, rel_tol=1e-9) and math.isclose(module.alpha, alpha, rel_tol=1e-6)
    if steps is not None:
        assert module.attack_steps == steps
    if beta is not None:
        assert module.beta == beta
    if noise is not None:
        assert module.hparams.nfgsm_noise == noise
    guard = guard_of(cli)
    assert guard.action == "warn" and guard.active(module)  # forced on: every row is watched, none stopped
    assert cli.trainer.limit_val_batches == 0  # the test images choose nothing


@pytest.mark.parametrize("name", [r.name for r in recipes.RECIPES if not r.pretrain])
def test_each_from_scratch_row_trains_as_its_paper_says(name, subset, tmp_path):
    setup = recipes.Setup(subset, logs=str(tmp_path))
    (stage,) = recipes.stages(recipes.BY_NAME[name], setup)
    cli = built(stage.args)
    assert_paper_settings(cli, name)
    assert cli.trainer.max_epochs == 15 and cli.model.hparams.cifar_stem  # imagefolder.yaml's
    decays = [cb.decay for cb in weight_averages(cli.trainer)]
    if name.endswith("_ema"):
        (decay,) = decays
        assert 0.98 < decay < 0.999 and decay ** (15 * 41 - 1) < 0.05  # averages over the run: no WeightEMA warning
    else:
        assert decays == []  # imagefolder.yaml's EMA turned off


def test_finetune_pretrains_clean_then_fine_tunes_from_that_checkpoint_for_the_rest(subset, tmp_path):
    setup = recipes.Setup(subset, epochs=15, pretrain_epochs=5, logs=str(tmp_path))
    pretrain, tune = recipes.stages(recipes.BY_NAME["finetune"], setup)
    first = built(pretrain.args)
    assert first.model.attack == "none" and first.trainer.max_epochs == 5 and weight_averages(first.trainer) == []
    assert not guard_of(first).active(first.model)  # clean training: nothing to watch
    assert tune.args.count(recipes.PREVIOUS_CKPT) == 1
    weights = tmp_path / "pretrained.pth"  # stands in for the first stage's last.ckpt (same architecture)
    torch.save(first.model.model.backbone.state_dict(), weights)
    second = built([str(weights) if a == recipes.PREVIOUS_CKPT else a for a in tune.args])
    assert_paper_settings(second, "finetune")
    assert second.trainer.max_epochs == 10 and second.model.hparams.backbone_lr_scale == 0.1
    assert second.model.weights_init["kind"] == "torchvision" and second.model.weights_init["fresh"] == []


def test_pretraining_must_leave_epochs_to_fine_tune(subset):
    for pretrain in (0, 3):
        with pytest.raises(RobustError, match="pretrain-epochs"):
            recipes.stages(recipes.BY_NAME["finetune"], recipes.Setup(subset, epochs=3, pretrain_epochs=pretrain))


def test_bad_input_is_one_clear_error_before_any_training(subset, tmp_path, capsys):
    with pytest.raises(RobustError, match="--batch-size"):
        recipes.Setup(subset, batch_size=0)
    assert recipes.main(["--data", str(tmp_path / "missing"), "--logs", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: data folder")
    assert recipes.main(["--data", subset, "--rows", "finetune", "--epochs", "1", "--logs", str(tmp_path)]) == 2
    assert "--pretrain-epochs must be at least 1 and below --epochs (1)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained


def test_options_reach_train_py_and_steps_follow_the_data(subset, tmp_path):
    argv = ["--data", subset, "--no-cifar-stem", "--batch-size", "64", "--limit-train-batches", "70", "--epochs", "6",
            "--logs", str(tmp_path), "--train-args=--overfit_guard.n 32"]  # fmt: skip
    setup = recipes.setup_of(recipes.parse_args(argv), torch.device("cpu"))
    n_train = sum(1 for p in (Path(subset) / "train").rglob("*") if p.is_file())
    assert setup.steps_per_epoch == min(70, math.ceil(n_train / 64)) and setup.pretrain_epochs == 2
    (stage,) = recipes.stages(recipes.BY_NAME["nfgsm_ema"], setup)
    cli = built(stage.args)
    assert cli.model.model.backbone.conv1.kernel_size == (7, 7)  # torchvision's stem
    assert cli.datamodule.batch_size == 64 and cli.trainer.limit_train_batches == 70 and guard_of(cli).n == 32
    assert weight_averages(cli.trainer)[0].decay == recipes.ema_decay(6 * setup.steps_per_epoch)


def test_cuda_takes_the_fast_configs_precision_and_memory_format():
    args = recipes.device_args("cuda")
    assert args[args.index("--trainer.precision") + 1] == "bf16-mixed"
    assert args[args.index("--model.channels_last") + 1] == "true"
    assert recipes.device_args("cpu") == ["--trainer.accelerator", "cpu"]


@pytest.mark.parametrize("steps", [20, 615, 5865, 10**6])
def test_ema_decay_averages_over_the_last_part_of_the_run(steps):
    decay = recipes.ema_decay(steps)
    assert decay ** (steps - 1) < 0.05  # WeightEMA's warning: the first step still weighs in
    assert 1 / (1 - decay) <= steps / 3 or decay == 0.999  # the horizon is a part of the run, or the cap's 1,000


def test_results_file_holds_rows_by_setup_and_survives_a_cut_line(tmp_path):
    path = tmp_path / "results.jsonl"
    setup, other = recipes.Setup("data", epochs=4), recipes.Setup("data", epochs=5)
    recipes.append_row(path, {"name": "nfgsm", "setup": setup.key(), "pgd10": 0.1})
    recipes.append_row(path, {"name": "fgsm_rs", "setup": other.key(), "pgd10": 0.2})
    recipes.append_row(path, {"name": "nfgsm", "setup": setup.key(), "pgd10": 0.3})
    with open(path, "a") as f:
        f.write('{"name": "pgd3", "setup"')  # a write cut short
    assert recipes.saved_rows(path, setup) == {"nfgsm": {"name": "nfgsm", "setup": setup.key(), "pgd10": 0.3}}
    assert list(recipes.saved_rows(path, other)) == ["fgsm_rs"]
    assert recipes.saved_rows(tmp_path / "none.jsonl", setup) == {}


@pytest.mark.slow  # two rows end to end, twice (the second run reads them back): about 1-2 minutes on 2 cores
def test_two_tiny_rows_print_rows_table_and_continue_from_the_results_file(subset, tmp_path):
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "experiments/recipes.py", "--rows", "nfgsm_ema", "finetune", "--data", subset,
           "--epochs", "2", "--pretrain-epochs", "1", "--limit-train-batches", "1", "--batch-size", "8",
           "--no-cifar-stem", "--test-images", "8", "--aa-images", "4", "--threads", "1", "--out", str(out),
           "--logs", str(tmp_path / "logs"),
           "--train-args=--overfit_guard.n 4 --overfit_guard.pgd_steps 1 --data.init_args.num_workers 0"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    assert [r["name"] for r in rows] == ["nfgsm_ema", "finetune"]
    assert all(tuple(r) == recipes.ROW_KEYS for r in rows)
    ema, tune = rows
    assert ema["epochs"] == tune["epochs"] == 2 and ema["steps"] == tune["steps"] == 2  # one batch per epoch
    assert ema["ema_decay"] == recipes.ema_decay(2) and tune["ema_decay"] is None
    assert len(ema["guard_pgd"]) == 3 and len(tune["guard_pgd"]) == 2  # before training, then per adversarial epoch
    for r in rows:
        assert (r["n_test"], r["n_aa"]) == (8, 4)
        for key in ("clean", "pgd10", "autoattack", "aa_clean", "aa_pgd10"):
            assert 0 <= r[key] <= 1
        assert r["train_s"] > r["probe_s"] > 0 and r["eval_s"] >= r["aa_s"] > 0
    pretrain_ckpt = tune["stages"][1][tune["stages"][1].index("--model.weights") + 1]
    assert Path(pretrain_ckpt).parts[-4:] == ("finetune_pretrain", "version_0", "checkpoints", "last.ckpt")
    assert Path(tune["checkpoint"]).is_file()
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert "| nfgsm_ema | N-FGSM | 8/255 | 0.5 | 2 | 2 |" in proc.stdout

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ROW " not in again.stdout and again.stdout.count("not rerun") == 2  # nothing trained again
    assert "| finetune | clean → FGSM-RS fine-tune | 8/255 | - | 2 | 2 |" in again.stdout
