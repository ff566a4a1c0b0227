"""The threat suite: worst cases, seeding and side effects, APGD, only what is asked runs, the spec's checks, and
how it adapts to 2 and 3 classes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import robust.threats
from robust.attacks import apgd_run, seeded_rng
from robust.errors import RobustError
from robust.threats import (
    DEFAULT_THREATS,
    WORST_CASES,
    ThreatSpec,
    accuracy,
    adaptations,
    apgd,
    check_classes,
    correct_counts,
    predictions,
    worst_case,
)
from robust.training.module import AdversarialClassifier

EPS = 0.015  # the small digits CNN: PGD fools about two thirds of it, FGSM less


@pytest.fixture(scope="module")
def batch(digits_val):
    x, y = digits_val
    return x[:24], y[:24]


@pytest.fixture(scope="module")
def suite(_digits_cnn_session, batch):
    """Every default threat's predictions on the batch, with the model in train mode (to check it is restored)."""
    x, y = batch
    model = _digits_cnn_session
    model.train()
    rng = torch.get_rng_state()
    try:
        preds = predictions(model, x, y, ThreatSpec(EPS, steps=5))
        side_effects = {"rng_kept": torch.equal(rng, torch.get_rng_state()), "mode_kept": model.training}
    finally:
        model.eval()
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


def test_a_key_does_not_depend_on_the_others_asked_and_is_seeded(digits_cnn, batch, suite):
    x, y = batch
    preds, _ = suite
    alone = predictions(digits_cnn, x, y, ThreatSpec(EPS, steps=5, threats=("pgd", "targeted_success")))
    assert set(alone) == {"pgd", "targeted_success", "target"}
    assert all(torch.equal(alone[k], preds[k]) for k in alone)
    other_seed = predictions(digits_cnn, x, y, ThreatSpec(EPS, steps=5, seed=1, threats=("targeted_success",)))
    assert not torch.equal(other_seed["target"], preds["target"])


def test_only_the_attacks_asked_for_run(digits_cnn, batch):
    x, y = batch
    calls = []
    hook = digits_cnn.register_forward_hook(lambda mod, inp, out: calls.append(len(inp[0])))
    try:
        # every example, every step: one forward per attack step and one per prediction, as many as asked
        for threats, forwards in [(("fgsm",), 2), (("pgd", "fgsm"), 5 + 1 + 2), (("clean", "jpeg"), 2)]:
            calls.clear()
            predictions(digits_cnn, x, y, ThreatSpec(EPS, steps=5, threats=threats, early_exit=False))
            assert calls == [len(y)] * forwards, threats
        # early exit: one clean forward first, then attacks on the examples still standing, never more forwards
        # than steps + 1 for PGD (its last verdict is its prediction), on shrinking batches
        for threats, most in [(("fgsm",), 1 + 2), (("pgd", "fgsm"), 1 + 2 + 5 + 1), (("clean", "jpeg"), 2)]:
            calls.clear()
            predictions(digits_cnn, x, y, ThreatSpec(EPS, steps=5, threats=threats))
            assert calls[0] == len(y) and len(calls) <= most and calls[1:] == sorted(calls[1:], reverse=True), calls
    finally:
        hook.remove()


def test_apgd_stays_in_budget_and_is_seeded(digits_cnn, batch):
    x, y = batch
    with torch.random.fork_rng():  # torchattacks reseeds the global RNG
        first = apgd(digits_cnn, x, y, EPS, steps=5)
        torch.rand(7)  # whatever the global stream, the seed decides
        again = apgd(digits_cnn, x, y, EPS, steps=5)
    assert (first - x).abs().max() <= EPS + 1e-6 and 0 <= first.min() and first.max() <= 1
    assert torch.equal(again, first)


def test_accuracy_is_the_mean_of_correct_predictions(digits_cnn, batch):
    x, y = batch
    spec = ThreatSpec(EPS, steps=2, threats=("clean", "fgsm", "targeted_success"))
    acc = accuracy(digits_cnn, x, y, spec, batch_size=len(x))
    preds = predictions(digits_cnn, x, y, spec)
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


# ---- the class count: 2 and 3 classes ---------------------------------------------------------------------------


def linear(classes: int, seed: int = 0) -> nn.Module:
    """A ``classes``-way linear model on 3×8×8 images (float64: attack arithmetic without rounding ties)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(3 * 8 * 8, classes).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(classes, 3 * 8 * 8, generator=g, dtype=torch.float64) * 0.3)
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin).eval()


def labelled(model: nn.Module, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images in [0, 1] labelled with the model's own prediction (every one starts correct)."""
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        return x, model(x).argmax(1)


@pytest.mark.parametrize("classes", [2, 3])
def test_the_default_suite_runs_on_two_and_three_classes(classes, monkeypatch):
    """Every default threat is measured; the APGD runs are what :func:`robust.threats.apgd_part` says (at 2 classes
    APGD-CE's alone, standing for APGD-DLR and APGD-T; at 3 the DLR and the targeted cross-entropy toward both other
    classes); the worst case is the per-example worst case of what ran, in a cascade too."""
    model = linear(classes)
    x, y = labelled(model)
    runs = []

    def spy(*args, **kwargs):
        runs.append({k: kwargs[k] for k in ("loss", "targets") if k in kwargs})
        return apgd_run(*args, **kwargs)

    monkeypatch.setattr(robust.threats, "apgd_run", spy)
    spec = ThreatSpec(0.02, steps=5)
    preds = predictions(model, x, y, spec)
    assert set(preds) == {*DEFAULT_THREATS, "target"}
    parts = torch.stack([preds[p] == y for p in spec.parts("pgd_worst")])
    assert torch.equal(preds["pgd_worst"] == y, parts.all(0)) and 0 < (preds["pgd_worst"] == y).sum() < len(y)
    if classes == 2:
        assert runs == [{}]  # APGD-CE once
        assert torch.equal(preds["apgd_dlr"], preds["apgd"]) and torch.equal(preds["apgd_t"], preds["apgd"])
        assert torch.equal(preds["target"], 1 - y)  # a targeted threat on 2 classes has one target
    else:
        assert runs == [{}, {"loss": "dlr"}, {"targets": 2, "loss": "ce"}]
    runs.clear()
    cascade = predictions(model, x, y, ThreatSpec(0.02, steps=5, cascade=True))
    assert torch.equal(cascade["pgd_worst"], preds["pgd_worst"])
    assert len(runs) == (1 if classes == 2 else 3)


def test_two_class_apgd_parts_are_apgd_ce_step_for_step():
    """What stands behind reusing APGD-CE's run at 2 classes: APGD-T's targeted loss toward the other class, from the
    same start, goes through the same iterates and fools the same images."""
    model = linear(2)
    x, y = labelled(model)
    everyone, nobody = torch.ones(len(y), dtype=torch.bool), torch.zeros(len(y), dtype=torch.bool)
    with seeded_rng(0):
        ce = apgd_run(model, x, y, 0.02, 10, seek=nobody, full=everyone)
    with seeded_rng(0):
        targeted = apgd_run(model, x, y, 0.02, 10, seek=nobody, full=everyone, targets=1, loss="ce")
    assert 0 < (ce.pred != y).sum() < len(y)
    assert torch.equal(ce.pred, targeted.pred) and torch.allclose(ce.last, targeted.last, atol=1e-12)


def test_apgd_losses_refuse_too_few_classes():
    x, y = labelled(linear(3))
    everyone = torch.ones(len(y), dtype=torch.bool)
    run = {"seek": ~everyone, "full": everyone}
    with pytest.raises(RobustError, match="the DLR loss needs 3 classes or more, the model has 2: use loss ce"):
        apgd_run(linear(2), x, y % 2, 0.02, 2, loss="dlr", **run)
    with pytest.raises(RobustError, match="the targeted DLR loss needs 4 classes or more, the model has 3"):
        apgd_run(linear(3), x, y, 0.02, 2, targets=2, **run)
    with pytest.raises(RobustError, match="APGD-T takes 1 to classes - 1 target classes, got 3 targets for 3"):
        apgd_run(linear(3), x, y, 0.02, 2, targets=3, loss="ce", **run)


def test_adaptations_say_what_ran_at_each_class_count():
    assert adaptations(10) == {} == adaptations(4)
    two = adaptations(2)
    assert set(two) == {"apgd_dlr", "apgd_t"} and {a["runs"] for a in two.values()} == {"APGD-CE"}
    assert "apgd's run stands for it" in two["apgd_t"]["note"]
    three = adaptations(3)
    assert list(three) == ["apgd_t"] and three["apgd_t"]["runs"] == "APGD-T-CE"
    assert "targeted cross-entropy toward 2 target classes" in three["apgd_t"]["note"]
    assert (
        "toward 3 target classes, all that 4 classes leave (asked: 9)"
        in adaptations(4, apgd_targets=9)["apgd_t"]["note"]
    )
    assert ThreatSpec(0.1, threats=("clean", "pgd")).adaptations(2) == {}  # only what the spec computes
    assert set(ThreatSpec(0.1, threats=("pgd_worst",)).adaptations(2)) == {"apgd_dlr", "apgd_t"}  # its parts


def test_too_few_classes_for_a_threat_is_one_line():
    model = linear(3)
    x, y = labelled(model)
    with pytest.raises(RobustError, match="autoattack needs a model with 4 classes or more .* leave out --autoattack"):
        predictions(model, x, y, ThreatSpec(0.02, threats=("clean", "autoattack")))
    with pytest.raises(RobustError, match="needs a model with 2 classes or more, this one has 1"):
        check_classes(("clean",), 1)
    with pytest.raises(RobustError, match="apgd_targets"):
        ThreatSpec(0.03, apgd_targets=0)
