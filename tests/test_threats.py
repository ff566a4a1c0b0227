"""The threat suite: worst cases, seeding and side effects, APGD, only what is asked runs, the spec's checks."""

from __future__ import annotations

import pytest
import torch

from robust.errors import RobustError
from robust.module import AdversarialClassifier
from robust.threats import (
    DEFAULT_THREATS,
    THREATS,
    WORST_CASES,
    ThreatSpec,
    accuracy,
    apgd,
    correct_counts,
    predictions,
    worst_case,
)

EPS = 0.1


@pytest.fixture(scope="module")
def batch(digits_val):
    x, y = digits_val
    return x[:24], y[:24]


@pytest.fixture(scope="module")
def suite(digits_model, batch):
    """Every default threat's predictions on the batch, with the model in train mode (to check it is restored)."""
    x, y = batch
    digits_model.train()
    rng = torch.get_rng_state()
    try:
        preds = predictions(digits_model, x, y, ThreatSpec(EPS, steps=5))
        side_effects = {"rng_kept": torch.equal(rng, torch.get_rng_state()), "mode_kept": digits_model.training}
    finally:
        digits_model.eval()
    return preds, side_effects


def test_worst_case_is_the_per_example_and_of_its_parts():
    y = torch.tensor([0, 1, 2, 3, 4])
    fgsm = torch.tensor([0, 1, 7, 3, 8])  # wrong on 2 and 4
    pgd = torch.tensor([0, 9, 2, 3, 6])  # wrong on 1 and 4
    worst = worst_case(y, [fgsm, pgd])
    assert ((worst == y) == ((fgsm == y) & (pgd == y))).all()
    assert worst.tolist() == [0, 9, 7, 3, 8]  # the first wrong part's prediction
    assert torch.equal(worst_case(y, [y, y]), y)


def test_worst_cases_never_exceed_their_parts_on_a_real_model(suite, batch):
    preds, _ = suite
    _, y = batch
    for key in WORST_CASES:
        if key not in preds:  # aa_worst: AutoAttack is opt-in
            continue
        parts = ThreatSpec(EPS, steps=5).parts(key)
        both = torch.stack([preds[p] == y for p in parts]).all(0)
        assert torch.equal(preds[key] == y, both)
        acc = (preds[key] == y).float().mean()
        assert all(acc <= (preds[p] == y).float().mean() for p in parts)


def test_predictions_of_every_threat_leave_rng_and_mode_alone(suite, batch):
    preds, side_effects = suite
    _, y = batch
    assert side_effects == {"rng_kept": True, "mode_kept": True}
    assert set(preds) == {*DEFAULT_THREATS, "target"}
    assert all(p.shape == y.shape for p in preds.values())
    acc = {k: (preds[k] == y).float().mean().item() for k in DEFAULT_THREATS if k != "targeted_success"}
    assert acc["clean"] > 0.85 and acc["pgd"] < acc["clean"] - 0.3 and acc["apgd"] < acc["clean"] - 0.3
    assert (preds["target"] != y).all()


def test_a_key_does_not_depend_on_the_others_asked_and_is_seeded(digits_model, batch, suite):
    x, y = batch
    preds, _ = suite
    alone = predictions(digits_model, x, y, ThreatSpec(EPS, steps=5, threats=("pgd", "targeted_success")))
    assert set(alone) == {"pgd", "targeted_success", "target"}
    assert all(torch.equal(alone[k], preds[k]) for k in alone)
    other_seed = predictions(digits_model, x, y, ThreatSpec(EPS, steps=5, seed=1, threats=("targeted_success",)))
    assert not torch.equal(other_seed["target"], preds["target"])


def test_only_the_attacks_asked_for_run(digits_model, batch):
    x, y = batch
    calls = []
    hook = digits_model.register_forward_hook(lambda mod, inp, out: calls.append(len(inp[0])))
    try:
        # every example, every step: one forward per attack step and one per prediction, as many as asked
        for threats, forwards in [(("fgsm",), 2), (("pgd", "fgsm"), 5 + 1 + 2), (("clean", "jpeg"), 2)]:
            calls.clear()
            predictions(digits_model, x, y, ThreatSpec(EPS, steps=5, threats=threats, early_exit=False))
            assert calls == [len(y)] * forwards, threats
        # early exit: one clean forward first, then attacks on the examples still standing, never more forwards
        # than steps + 1 for PGD (its last verdict is its prediction), on shrinking batches
        for threats, most in [(("fgsm",), 1 + 2), (("pgd", "fgsm"), 1 + 2 + 5 + 1), (("clean", "jpeg"), 2)]:
            calls.clear()
            predictions(digits_model, x, y, ThreatSpec(EPS, steps=5, threats=threats))
            assert calls[0] == len(y) and len(calls) <= most and calls[1:] == sorted(calls[1:], reverse=True), calls
    finally:
        hook.remove()


def test_apgd_stays_in_budget_and_is_seeded(digits_model, batch):
    x, y = batch
    with torch.random.fork_rng():  # torchattacks reseeds the global RNG
        first = apgd(digits_model, x, y, EPS, steps=5)
        torch.rand(7)  # whatever the global stream, the seed decides
        again = apgd(digits_model, x, y, EPS, steps=5)
    assert (first - x).abs().max() <= EPS + 1e-6 and 0 <= first.min() and first.max() <= 1
    assert torch.equal(again, first)


def test_accuracy_is_the_mean_of_correct_predictions(digits_model, batch):
    x, y = batch
    spec = ThreatSpec(EPS, steps=2, threats=("clean", "fgsm", "targeted_success"))
    acc = accuracy(digits_model, x, y, spec, batch_size=len(x))
    preds = predictions(digits_model, x, y, spec)
    assert acc["clean"] == pytest.approx((preds["clean"] == y).float().mean().item())
    assert acc["targeted_success"] == pytest.approx((preds["targeted_success"] == preds["target"]).float().mean())
    counts = correct_counts(preds, y, spec.threats)
    assert dict(zip(spec.threats, [c / len(y) for c in counts], strict=True)) == pytest.approx(acc)


def test_step_defaults():
    assert ThreatSpec(0.1).step == pytest.approx(0.025) and ThreatSpec(0.0).step == pytest.approx(1 / 255)
    assert ThreatSpec(0.1).step == pytest.approx(0.025) and ThreatSpec(0.1, alpha=0.01).step == 0.01
    expected = {"fgsm_rs": 0.125, "fgsm": 0.1, "pgd": 0.025, "none": 0.1}
    assert {a: AdversarialClassifier.default_alpha(a, "ce", 0.1) for a in expected} == pytest.approx(expected)


@pytest.mark.parametrize(
    "bad",
    [
        {"eps": 2.0},
        {"eps": 0.1, "steps": 0},
        {"eps": 0.1, "restarts": 0},
        {"eps": 0.1, "quality": 101},
        {"eps": 0.1, "threats": ("pgd", "cw")},
        {"eps": 0.1, "threats": ()},
    ],
)
def test_bad_specs_are_clear_errors(bad):
    with pytest.raises(RobustError):
        ThreatSpec(**bad)


def test_every_key_has_one_place():
    assert len(set(THREATS)) == len(THREATS) and "autoattack" not in DEFAULT_THREATS
    assert all(set(parts) <= set(THREATS) for parts in WORST_CASES.values())
