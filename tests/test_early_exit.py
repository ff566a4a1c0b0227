"""Attack only what still stands: PGD's per-example early exit, restarts on survivors, clean mistakes not attacked,
and the worst cases' cascade.

Exactness is checked on a float64 linear model (its per-example arithmetic does not depend on the batch around it);
the relations between figures (never above the all-steps run, the cascade below each part) on the small trained
digits CNN. Every verdict is fixed by seeds, none by a training trajectory or timing.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robust.attacks import pgd, pgd_run
from robust.threats import AUTOATTACK_THREATS, ThreatSpec, predictions
from robust.threats import WORST_CASES as ALL_WORST_CASES

# AutoAttack and Square are opt-in and slow: the cheap worst cases, with the parts a default spec runs.
WORST_CASES = {k: ThreatSpec(0.03).parts(k) for k in ALL_WORST_CASES if k not in AUTOATTACK_THREATS}

SHAPE = (3, 8, 8)  # JPEG needs 1 or 3 channels


def linear_model(classes=4, seed=0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(SHAPE)
    lin = nn.Linear(n, classes).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(classes, n, generator=g, dtype=torch.float64) * 0.3)
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin).eval()


def linear_batch(model, n=64, seed=1):
    """Images in [0, 1] labelled with the model's own prediction (so every one starts correct), but the first 6
    labelled otherwise (clean mistakes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:6] = (y[:6] + 1) % 4
    return x, y


class Recorder(nn.Module):
    """The model, recording the batch size of each forward and whether it was a gradient (attack-step) forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        self.calls.append((len(x), torch.is_grad_enabled() and x.requires_grad))
        return self.model(x)


def predicted(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def test_an_example_leaves_at_the_step_it_is_fooled_and_keeps_that_iterate():
    model = linear_model()
    x, y = linear_batch(model)
    eps, alpha, steps = 0.03, 0.006, 8
    # all-steps iterates 0..steps, deterministic without random start
    iterates = [x] + [pgd(model, x, y, eps, alpha, k, random_start=False) for k in range(1, steps + 1)]
    fooled = torch.stack([predicted(model, it) != y for it in iterates])  # (steps + 1)×N
    first = torch.where(fooled.any(0), fooled.float().argmax(0), torch.full_like(y, steps))
    assert len(set(first.tolist())) >= 4 and (~fooled.any(0)).sum() >= 5, first  # the construction has variety
    assert (first[:6] == 0).all()  # clean mistakes leave before their first step

    run = pgd_run(
        model,
        x,
        y,
        eps,
        alpha,
        steps,
        seek=torch.ones_like(y, dtype=torch.bool),
        full=torch.zeros_like(y, dtype=torch.bool),
        random_start=False,
    )
    expected = torch.stack([iterates[k][i] for i, k in enumerate(first.tolist())])
    assert torch.equal(run.first, expected)
    assert torch.equal(run.pred, predicted(model, expected))
    early = pgd(model, x, y, eps, alpha, steps, random_start=False, early_exit=True)
    assert torch.equal(early, expected)
    never = ~fooled.any(0)
    assert torch.equal(early[never], iterates[-1][never])  # the survivors ran every step, as the all-steps run


def test_the_batch_shrinks_and_each_forward_is_the_step_it_needs():
    model = linear_model()
    x, y = linear_batch(model)
    rec = Recorder(model)
    pgd(rec, x, y, 0.03, 0.006, 8, random_start=False, early_exit=True)
    sizes = [s for s, _ in rec.calls]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == len(y) and sizes[-1] < len(y) // 2
    assert len(rec.calls) <= 8 + 1 and [grad for _, grad in rec.calls[:-1]] == [True] * (len(rec.calls) - 1)


def test_restarts_run_only_on_the_survivors():
    model = linear_model()
    x, y = linear_batch(model)
    eps, alpha, steps = 0.03, 0.006, 3
    with torch.random.fork_rng():
        torch.manual_seed(0)
        one = pgd(model, x, y, eps, alpha, steps, early_exit=True)
        survivors = int((predicted(model, one) == y).sum())
        torch.manual_seed(0)
        rec = Recorder(model)
        three = pgd(rec, x, y, eps, alpha, steps, early_exit=True, restarts=3)
    # a restart ends with the no-grad check of its final iterate; the next one starts on what still stands
    ends = [i for i, (_, grad) in enumerate(rec.calls) if not grad]
    assert len(ends) >= 2 and 0 < survivors < len(y)
    assert rec.calls[ends[0] + 1][0] == survivors
    assert max(s for s, _ in rec.calls[ends[0] + 1 :]) <= survivors
    fooled_first = predicted(model, one) != y
    assert torch.equal(three[fooled_first], one[fooled_first])  # each keeps its first successful restart's image
    assert (predicted(model, three) == y).sum() <= survivors


def test_all_steps_restarts_also_run_only_on_what_the_earlier_ones_did_not_fool():
    model = linear_model()
    x, y = linear_batch(model)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        rec = Recorder(model)
        pgd(rec, x, y, 0.03, 0.006, 3, restarts=2)
    sizes = [s for s, _ in rec.calls]
    assert sizes[:4] == [len(y)] * 4 and max(sizes[4:]) < len(y)


@pytest.mark.parametrize("eps", [0.007, 0.015])
def test_early_exit_accuracy_is_never_above_the_all_steps_run(digits_cnn, digits_val, eps):
    x, y = digits_val[0][:96], digits_val[1][:96]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        every = predicted(digits_cnn, pgd(digits_cnn, x, y, eps, eps / 4, 5, restarts=2))
        torch.manual_seed(0)
        early = predicted(digits_cnn, pgd(digits_cnn, x, y, eps, eps / 4, 5, restarts=2, early_exit=True))
    acc_every, acc_early = (every == y).float().mean().item(), (early == y).float().mean().item()
    clean = (predicted(digits_cnn, x) == y).float().mean().item()
    # something to measure: PGD fools some images and leaves some (how many depends on the trained model)
    assert acc_early <= acc_every and 0.0 < acc_every < clean, (acc_early, acc_every, clean)


def test_where_nothing_is_fooled_early_exit_is_the_all_steps_run(digits_cnn, digits_val):
    x, y = digits_val
    with torch.no_grad():
        logits = digits_cnn(x)
    top2 = logits.topk(2, 1).values
    margin = torch.where(logits.argmax(1) == y, top2[:, 0] - top2[:, 1], -1.0)
    keep = margin.argsort(descending=True)[:32]  # the 32 surest right answers: eps 1e-4 cannot move them
    x, y = x[keep], y[keep]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        every = pgd(digits_cnn, x, y, 1e-4, 2.5e-5, 4)
        torch.manual_seed(0)
        early = pgd(digits_cnn, x, y, 1e-4, 2.5e-5, 4, early_exit=True)
    assert (predicted(digits_cnn, every) == y).all()
    assert torch.equal(early, every)


def test_targeted_early_exit_keeps_the_first_iterate_at_the_target(digits_cnn, digits_val):
    x, y = digits_val[0][:48], digits_val[1][:48]
    target = (y + 1) % 10
    with torch.random.fork_rng():
        torch.manual_seed(0)
        every = predicted(digits_cnn, pgd(digits_cnn, x, target, 0.05, 0.0125, 5, targeted=True))
        torch.manual_seed(0)
        early = pgd(digits_cnn, x, target, 0.05, 0.0125, 5, targeted=True, early_exit=True)
    reached = predicted(digits_cnn, early) == target
    assert reached.float().mean() >= (every == target).float().mean()


# ---- the threat suite ----------------------------------------------------------------------------------


def test_clean_mistakes_are_not_attacked_and_keep_their_clean_prediction():
    model = linear_model()
    x, y = linear_batch(model)
    rec = Recorder(model)
    spec = ThreatSpec(0.03, steps=3, threats=("clean", "fgsm", "pgd", "apgd", "jpeg", "jpeg_pgd", "bpda_pgd"))
    preds = predictions(rec, x, y, spec)
    clean_wrong, jpeg_wrong = preds["clean"] != y, preds["jpeg"] != y
    assert clean_wrong.sum() == 6 and jpeg_wrong.sum() >= 6
    for key in ("fgsm", "pgd", "apgd"):
        assert torch.equal(preds[key][clean_wrong], preds["clean"][clean_wrong]), key
    for key in ("jpeg_pgd", "bpda_pgd"):
        assert torch.equal(preds[key][jpeg_wrong], preds["jpeg"][jpeg_wrong]), key
    # after the clean and JPEG forwards, no attack forward sees a clean mistake of the model it attacks
    assert rec.calls[0][0] == rec.calls[1][0] == len(y)
    assert max(s for s, _ in rec.calls[2:]) <= max(int((~clean_wrong).sum()), int((~jpeg_wrong).sum()))


def test_early_exit_off_attacks_everything_as_before():
    model = linear_model()
    x, y = linear_batch(model)
    rec = Recorder(model)
    predictions(rec, x, y, ThreatSpec(0.03, steps=3, threats=("fgsm", "pgd"), early_exit=False))
    assert [s for s, _ in rec.calls] == [len(y)] * (2 + 3 + 1)


def test_the_cascade_is_the_independent_worst_case_where_the_attacks_are_deterministic():
    """FGSM, PGD, APGD and PGD through JPEG give each example the same images whatever else runs (random starts are
    drawn for the whole batch): the cascade's worst cases equal the independent run's, per example."""
    model = linear_model()
    x, y = linear_batch(model)
    parts = ("fgsm", "pgd", "jpeg_fgsm", "jpeg_pgd", "bpda_pgd")
    keys = ("pgd_worst", "jpeg_worst", *parts, "apgd", "apgd_dlr", "apgd_t")
    independent = predictions(model, x, y, ThreatSpec(0.015, 0.004, steps=10, threats=keys))
    cascade_spec = ThreatSpec(0.015, 0.004, steps=10, threats=keys, cascade=True)
    cascade = predictions(model, x, y, cascade_spec)
    assert cascade_spec.mode == "cascade" and ThreatSpec(0.03).mode == "independent"
    right = {k: independent[k] == y for k in keys}
    # later parts do break examples the earlier ones left: the chains are really exercised
    assert (right["fgsm"] & ~right["pgd"]).any() and (right["jpeg_fgsm"] & right["jpeg_pgd"] & ~right["bpda_pgd"]).any()
    assert torch.equal(cascade["jpeg_worst"] == y, right["jpeg_worst"])
    assert torch.equal(cascade["pgd_worst"] == y, right["pgd_worst"])
    assert torch.equal(cascade["fgsm"] == y, right["fgsm"])
    assert torch.equal(cascade["pgd"] == y, right["fgsm"] & right["pgd"])  # the accuracy after FGSM then PGD
    for worst, chain in WORST_CASES.items():
        assert 0 < (cascade[worst] == y).sum() < len(y)  # something to measure
        for part in chain:
            assert (cascade[worst] == y).sum() <= right[part].sum(), (worst, part)


def test_a_cascade_part_alone_runs_the_parts_before_it():
    model = linear_model()
    x, y = linear_batch(model)
    alone = predictions(model, x, y, ThreatSpec(0.03, steps=3, threats=("jpeg_pgd",), cascade=True))
    full = predictions(model, x, y, ThreatSpec(0.03, steps=3, cascade=True))
    assert set(alone) == {"jpeg_pgd"} and torch.equal(alone["jpeg_pgd"], full["jpeg_pgd"])


def test_cascade_worst_case_is_below_each_part_on_a_real_model(digits_cnn, digits_val):
    x, y = digits_val[0][:32], digits_val[1][:32]
    keys = ("pgd_worst", "jpeg_worst", *WORST_CASES["pgd_worst"], *WORST_CASES["jpeg_worst"])
    independent = predictions(digits_cnn, x, y, ThreatSpec(0.007, steps=3, threats=keys))
    cascade = predictions(digits_cnn, x, y, ThreatSpec(0.007, steps=3, threats=keys, cascade=True))
    acc = {k: (independent[k] == y).sum().item() for k in keys}
    for worst, parts in WORST_CASES.items():
        got = (cascade[worst] == y).sum().item()
        assert got <= min(acc[p] for p in parts), (worst, got, acc)
    # the cascade's figures only fall along a chain: each is the accuracy after that part and those before it
    for parts in WORST_CASES.values():
        chain = [(cascade[p] == y).sum().item() for p in parts]
        assert chain == sorted(chain, reverse=True), chain


@pytest.mark.slow  # torchattacks' AutoAttack components, one by one
def test_the_component_benchmark_runs(digits_cnn, digits_val):
    """``benchmarks/autoattack_components.py`` on 6 images, 2 iterations: its rows add up (no timing verdict)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "autoattack_components.py"
    spec = importlib.util.spec_from_file_location("bench_autoattack_components", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x, y = digits_val[0][:6], digits_val[1][:6]
    row = bench.measure_components(digits_cnn, x, y, 0.03, steps=2, square_queries=5)
    assert row["cheap_survivors"] <= row["clean"] <= 6
    whole = bench.measure_components(digits_cnn, x, y, 0.03, steps=2, square_queries=5, cheap="pgd_worst")
    assert whole["cheap_survivors"] <= row["cheap_survivors"]  # the whole cheap worst case leaves no more
    assert all(0 <= n <= row["cheap_survivors"] for n in row["fooled"].values())
    assert row["fooled_by_any"] >= max(v for k, v in row["fooled"].items() if not k.startswith("ours"))
    cost = bench.measure_cost(digits_cnn, x, y, 0.03)
    assert [r["mode"] for r in cost] == ["every example, every step", "early exit", "early exit + cascade"]
    every, early, cascade = (r["pgd_worst"] for r in cost)
    assert cascade == early <= every
