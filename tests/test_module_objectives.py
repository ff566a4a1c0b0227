"""The training objectives and N-FGSM wired into AdversarialClassifier and train.py."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_fit_args

import train
from robust.attacks import nfgsm, seeded_rng
from robust.errors import RobustError
from robust.models.build import card_of
from robust.models.resolve import load_model
from robust.objectives import objective_loss, trades_pgd
from robust.training.module import AdversarialClassifier


def module(**kw) -> AdversarialClassifier:
    return AdversarialClassifier(mean=(0.5,) * 3, std=(0.5,) * 3, cifar_stem=True, eps=0.1, **kw).eval()


def test_training_attack_is_the_library_attack_with_the_module_settings(digits_val):
    x, y = digits_val[0][:8, :, ::4, ::4], digits_val[1][:8]  # 8×8
    m = module(attack="nfgsm", nfgsm_noise=1.5)
    assert m.alpha == pytest.approx(0.1)  # N-FGSM's step is eps
    with seeded_rng(3):
        ours = m.make_training_attack(x, y)
    with seeded_rng(3):
        direct = nfgsm(m, x, y, 0.1, noise=1.5, alpha=0.1)
    assert torch.equal(ours, direct)
    m = module(attack="pgd", objective="trades")
    assert m.attack_steps == 10 and m.alpha == pytest.approx(0.007 / 0.031 * 0.1)
    with seeded_rng(3):
        ours = m.make_training_attack(x, y)
    with seeded_rng(3):
        direct = trades_pgd(m, x, 0.1, m.alpha, 10)
    assert torch.equal(ours, direct)


def test_trades_step_minimizes_the_trades_loss_of_its_own_examples(digits_val):
    x, y = digits_val[0][:8, :, ::4, ::4], digits_val[1][:8]
    m = module(attack="pgd", objective="trades", attack_steps=2)
    m.train()
    twin = copy.deepcopy(m)  # the step's forward passes move BatchNorm's running statistics
    with seeded_rng(0):
        loss = m.paired_objective_step(x, y)
    with seeded_rng(0):
        x_adv = twin.make_training_attack(x, y)
    expected = objective_loss("trades", twin(x_adv), y, logits_clean=twin(x), beta=6.0)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"attack": "fgsm_rs", "objective": "trades"}, "cannot train with attack"),
        ({"attack": "pgd", "objective": "mart", "adv_ratio": 0.5}, "adv_ratio must be 1"),
        ({"attack": "pgd", "objective": "trades", "target": "random"}, "untargeted"),
        ({"attack": "nfgsm", "nfgsm_noise": -1.0}, "nfgsm_noise"),
    ],
)
def test_refused_combinations_are_one_line_errors(kw, match):
    with pytest.raises(RobustError, match=match):
        module(**kw)


@pytest.mark.parametrize(
    "extra",
    [["--model.attack", "nfgsm"], ["--model.attack", "pgd", "--model.objective", "mart", "--model.attack_steps", "2"]],
)
def test_train_cli_runs_each_recipe(tmp_path, extra):
    cli = train.main(tiny_fit_args(tmp_path, *extra))
    assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    training = card_of(load_model(cli.trainer.checkpoint_callback.best_model_path)).training
    m = cli.model  # the card records what was in force, defaults resolved
    assert training.attack_steps == m.attack_steps and training.beta == m.beta and training.alpha == m.alpha
    assert (training.attack, training.objective) == (m.hparams.attack, m.hparams.objective)


def test_train_cli_refuses_a_bad_combination_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_fit_args(tmp_path, "--model.objective", "trades", "--model.attack", "fgsm_rs"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot train with attack 'fgsm_rs'" in err and "Traceback" not in err
