"""``experiments/recipes.py``: each recipe's train.py arguments mean what its docstring says (checked on the module
and trainer train.py builds from them, without training), that an EMA run's trained weights are those of the same run
without EMA (so one run gives both rows), the results file, and one tiny end-to-end run (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_ARCH_ARGS

import train
from experiments import recipes
from robust.errors import RobustError
from robust.files import load_checkpoint
from robust.models.resolve import model_from_ckpt
from robust.training.averaging import weight_averages
from robust.training.guard import CatastrophicOverfittingGuard

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN_ARGS = ("--overfit_guard.n", "4", "--overfit_guard.pgd_steps", "1", "--data.init_args.num_workers", "0")
IN_PROCESS_ARGS = (*TINY_TRAIN_ARGS, *TINY_ARCH_ARGS)  # the suite's tiny CNN is known in this process only
E8, E16 = 8 / 255, 16 / 255
# Per recipe, written out from the papers (recipes.py's docstring): attack, objective, eps, training step, PGD steps,
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
# (peak lr, weight decay) where a recipe trains with its own script's: MART's train_resnet.py; else imagefolder.yaml's
OPTIMIZER = {"mart": (0.01, 3.5e-3)}


@pytest.fixture(scope="module")
def subset(shared_data) -> str:
    return str(shared_data / "cifar10-subset")


def built(args: list[str]):
    """train.py's CLI for ``args``, built but not fitted."""
    return train.main(args, run=False)


def guard_of(cli) -> CatastrophicOverfittingGuard:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, CatastrophicOverfittingGuard))


def assert_paper_settings(cli, name: str) -> None:
    attack, objective, eps, alpha, steps, beta, noise = PAPERS[name]
    module = cli.model
    assert (module.attack, module.hparams.objective) == (attack, objective)
    assert math.isclose(module.hparams.eps, eps, rel_tol=1e-9) and math.isclose(module.alpha, alpha, rel_tol=1e-6)
    if steps is not None:
        assert module.attack_steps == steps
    if beta is not None:
        assert module.beta == beta
    if noise is not None:
        assert module.hparams.nfgsm_noise == noise
    shared = yaml.safe_load(recipes.CONFIG.read_text())["model"]["optimizer"]["init_args"]
    expected = OPTIMIZER.get(name, (shared["lr"], shared["weight_decay"]))
    optimizer = module.optimizer(module.parameters())
    assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == expected
    guard = guard_of(cli)
    assert guard.action == "warn" and guard.active(module)  # forced on: every run is watched, none stopped
    assert cli.trainer.limit_val_batches == 0  # the test images choose nothing


@pytest.mark.parametrize("name", [r.name for r in recipes.RECIPES if not r.pretrain])
def test_each_from_scratch_recipe_trains_as_its_paper_says(name, subset, tmp_path):
    setup = recipes.Setup(subset, logs=str(tmp_path))
    (stage,) = recipes.stages(recipes.BY_NAME[name], setup)
    cli = built(stage.args)
    assert_paper_settings(cli, name)
    assert cli.trainer.max_epochs == 15 and cli.model.hparams.cifar_stem  # imagefolder.yaml's
    decays = [cb.decay for cb in weight_averages(cli.trainer)]
    if recipes.BY_NAME[name].ema:
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
    assert second.model.weights_init["kind"] == "state_dict" and second.model.weights_init["fresh"] == []
    assert [cb.decay for cb in weight_averages(second.trainer)] == [recipes.ema_decay(10 * 41)]  # of its own steps


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
    argv = [
        "--data",
        subset,
        "--no-cifar-stem",
        "--batch-size",
        "64",
        "--limit-train-batches",
        "70",
        "--epochs",
        "6",
        "--logs",
        str(tmp_path),
        "--train-args=--overfit_guard.n 32",
    ]
    setup = recipes.setup_of(recipes.parse_args(argv), torch.device("cpu"))
    n_train = sum(1 for p in (Path(subset) / "train").rglob("*") if p.is_file())
    assert setup.steps_per_epoch == min(70, math.ceil(n_train / 64)) and setup.pretrain_epochs == 2
    (stage,) = recipes.stages(recipes.BY_NAME["nfgsm"], setup)
    cli = built(stage.args)
    assert cli.model.model.backbone.conv1.kernel_size == (7, 7)  # torchvision's stem
    assert cli.datamodule.batch_size == 64 and cli.trainer.limit_train_batches == 70 and guard_of(cli).n == 32
    assert weight_averages(cli.trainer)[0].decay == recipes.ema_decay(6 * setup.steps_per_epoch)


def test_rows_are_named_after_their_recipe_and_the_eps16_pair_has_no_ema():
    assert recipes.BY_NAME["finetune"].row_names == ("finetune", "finetune_ema")
    assert [r.name for r in recipes.RECIPES if not r.ema] == ["fgsm_rs_eps16", "nfgsm_eps16"]
    assert recipes.BY_NAME["nfgsm_eps16"].row_names == ("nfgsm_eps16",)


def test_an_ema_run_trains_the_very_weights_of_the_run_without_it(subset, tmp_path):
    """The premise of one run per recipe: the EMA run's trained weights are bit-identical to the plain run's (same
    seed, same operations, same process), and its average is not them."""
    setup = recipes.Setup(
        subset,
        epochs=2,
        steps_per_epoch=2,
        cifar_stem=False,
        batch_size=8,
        limit_train_batches=2,
        train_args=IN_PROCESS_ARGS,
    )
    ema_recipe = recipes.BY_NAME["nfgsm"]  # N-FGSM draws noise every step: any extra RNG draw would show
    runs = {}
    for recipe in (ema_recipe, replace(ema_recipe, ema=False)):
        trained = recipes.train_recipe(recipe, replace(setup, logs=str(tmp_path / str(recipe.ema))))
        runs[recipe.ema] = trained, load_checkpoint(trained["checkpoint"])
    (with_ema, averaged), (without, plain) = runs[True], runs[False]
    assert averaged["ema_decay"] == recipes.ema_decay(4) and "current_model_state" not in plain
    trained = averaged["current_model_state"]
    assert trained.keys() == plain["state_dict"].keys()
    assert all(torch.equal(trained[k], v) for k, v in plain["state_dict"].items())
    assert with_ema["guard_pgd"] == without["guard_pgd"] and with_ema["steps"] == without["steps"] == 4
    floats = [k for k, v in trained.items() if v.is_floating_point()]
    assert max((averaged["state_dict"][k] - trained[k]).abs().max().item() for k in floats) > 1e-4
    # What run_recipe measures as the trained weights: the plain run's model, card's decay included.
    as_plain = recipes.trained_checkpoint(averaged)
    model, reference = model_from_ckpt(as_plain, "trained"), model_from_ckpt(plain, "plain").state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert model.card.training.ema_decay is None and not {"averaging_state", "ema_decay"} & set(as_plain)
    with pytest.raises(RobustError, match="not trained with EMA"):
        recipes.trained_checkpoint(plain)


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


def test_a_recipe_is_done_only_when_all_its_rows_are_saved():
    saved = {name: {"name": name} for name in ("nfgsm", "fgsm_rs_ema", "nfgsm_eps16")}
    assert recipes.finished(recipes.BY_NAME["nfgsm"], saved) is None  # its average was not measured: run again
    assert recipes.finished(recipes.BY_NAME["fgsm_rs"], saved) is None
    assert recipes.finished(recipes.BY_NAME["nfgsm_eps16"], saved) == [{"name": "nfgsm_eps16"}]
    saved["nfgsm_ema"] = {"name": "nfgsm_ema"}
    assert recipes.finished(recipes.BY_NAME["nfgsm"], saved) == [{"name": "nfgsm"}, {"name": "nfgsm_ema"}]


@pytest.mark.slow  # two recipes (four rows) end to end, twice (the second run reads them back): 1-2 minutes on 2 cores
def test_two_tiny_recipes_print_rows_table_and_continue_from_the_results_file(subset, tmp_path):
    out = tmp_path / "results.jsonl"
    cmd = [
        sys.executable,
        "experiments/recipes.py",
        "--rows",
        "nfgsm",
        "finetune",
        "--data",
        subset,
        "--epochs",
        "2",
        "--pretrain-epochs",
        "1",
        "--limit-train-batches",
        "1",
        "--batch-size",
        "8",
        "--no-cifar-stem",
        "--test-images",
        "8",
        "--aa-images",
        "4",
        "--threads",
        "1",
        "--out",
        str(out),
        "--logs",
        str(tmp_path / "logs"),
        f"--train-args={' '.join(TINY_TRAIN_ARGS)}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    assert [r["name"] for r in rows] == ["nfgsm", "nfgsm_ema", "finetune", "finetune_ema"]
    assert all(tuple(r) == recipes.ROW_KEYS for r in rows)
    nfgsm, nfgsm_ema, tune, tune_ema = rows
    for trained, averaged in ((nfgsm, nfgsm_ema), (tune, tune_ema)):  # one run: its training fields in both rows
        assert all(trained[k] == averaged[k] for k in ("steps", "train_s", "probe_s", "guard_pgd", "checkpoint"))
        assert trained["stages"] == averaged["stages"] and trained["ema_decay"] is None
    assert nfgsm["epochs"] == tune["epochs"] == 2 and nfgsm["steps"] == tune["steps"] == 2  # one batch per epoch
    assert nfgsm_ema["ema_decay"] == recipes.ema_decay(2) and tune_ema["ema_decay"] == recipes.ema_decay(1)
    assert len(nfgsm["guard_pgd"]) == 3 and len(tune["guard_pgd"]) == 2  # before training, then per adversarial epoch
    for r in rows:
        assert (r["n_test"], r["n_aa"]) == (8, 4)
        for key in ("clean", "pgd10", "autoattack", "aa_clean", "aa_pgd10"):
            assert 0 <= r[key] <= 1
        # AutoAttack attacks only the images the model gets right: a two-step model may leave it nothing (0 s)
        assert r["train_s"] > r["probe_s"] > 0 and r["eval_s"] >= r["aa_s"] >= 0
    pretrain_ckpt = tune["stages"][1][tune["stages"][1].index("--model.weights") + 1]
    assert Path(pretrain_ckpt).parts[-4:] == ("finetune_pretrain", "version_0", "checkpoints", "last.ckpt")
    assert Path(tune["checkpoint"]).is_file()
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert "| nfgsm | N-FGSM | 8/255 | - | 2 | 2 |" in proc.stdout
    assert "| nfgsm_ema | N-FGSM | 8/255 | 0.5 | 2 | 2 |" in proc.stdout
    assert "- nfgsm: " in proc.stdout and "- nfgsm_ema: " not in proc.stdout  # one guard trajectory per run

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ROW " not in again.stdout and again.stdout.count("not rerun") == 2  # nothing trained again
    assert "| finetune | clean → FGSM-RS fine-tune | 8/255 | - | 2 | 2 |" in again.stdout
