"""AutoAttack in the threat suite: torchattacks' standard components and settings, the suite's APGD verdicts reused
for its APGD-CE and APGD-T, and FAB-T and Square pooled over the batches of a report's group.

The models are small and random (a 10-class MLP and linear model on 3×8×8 images labelled with their own
predictions) and FAB-T and Square are cut down (2 FAB steps, 20 Square queries), so the tests stay fast: what is
checked is the bookkeeping, which is exact, not the attacks' strength (``tests/test_report.py``'s slow test runs the
real AutoAttack on the digits model, and ``benchmarks/run.py --only report`` compares the figure with torchattacks')."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import Tensor, nn

import robust.threats
from robust.attacks import apgd_run, seeded_rng
from robust.evaluation.report import batch_counts
from robust.evaluation.sharding import Journal, World, sharded_counts
from robust.threats import (
    DEFAULT_THREATS,
    POOLED,
    ThreatSpec,
    autoattack_components,
    finish_autoattack,
    predictions,
)

EPS = 0.01  # about half of the MLP's images stand through AutoAttack's APGDs here, so FAB-T and Square have work
CPU = torch.device("cpu")


def mlp() -> nn.Module:
    """A random 10-class MLP on 3×8×8 images in [0, 1], centred so its predictions spread over the classes."""
    torch.manual_seed(0)
    first, last = nn.Linear(192, 64), nn.Linear(64, 10)
    with torch.no_grad():
        first.bias.copy_(-first.weight.sum(1) * 0.5)
        last.bias.zero_()
    return nn.Sequential(nn.Flatten(), first, nn.ReLU(), last).eval()


def labelled(model: nn.Module, n: int = 64) -> tuple[Tensor, Tensor]:
    """``n`` random images labelled with the model's own predictions (every one starts correct)."""
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return x, model(x).argmax(1)


@pytest.fixture
def cut_down(monkeypatch):
    """AutoAttack's components with FAB-T at 2 steps and Square at 20 queries (its APGDs as torchattacks has them)."""

    def components(*args, **kwargs):
        parts = autoattack_components(*args, **kwargs)
        parts[2].steps, parts[3].n_queries = 2, 20
        return parts

    monkeypatch.setattr(robust.threats, "autoattack_components", components)


def test_the_components_are_torchattacks_standard_autoattack():
    """What the reuse relies on, read from torchattacks itself: APGD-CE 10 steps x 1, APGD-T 10 x 1 toward classes - 1
    targets, FAB-T, Square with 5,000 queries, all seeded with the spec's seed."""
    ce, targeted, fab, square = autoattack_components(mlp(), ThreatSpec(EPS, seed=3), 10)
    assert (type(ce), type(targeted), type(fab), type(square)) == (
        torchattacks.APGD,
        torchattacks.APGDT,
        torchattacks.FAB,
        torchattacks.Square,
    )
    assert (ce.loss, ce.steps, ce.n_restarts) == ("ce", 10, 1)
    assert (targeted.steps, targeted.n_restarts, targeted.n_target_classes) == (10, 1, 9)
    assert fab.multi_targeted and square.n_queries == 5000
    assert {ce.seed, targeted.seed, fab.seed, square.seed} == {3} and ce.eps == EPS


def test_skipped_targets_continue_a_shorter_apgd_t_run():
    """APGD-T toward 1 target, then toward 9 skipping the first on what it left standing, fools exactly the examples
    one run toward 9 fools, through the very same iterates: the skipped target's random starts are drawn. The
    model's second class has the first one's weights, so the first target is out of reach and the later ones work."""
    lin = nn.Linear(192, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(10, 192, generator=torch.Generator().manual_seed(0)) * 0.3)
        lin.weight[1] = lin.weight[0]
        lin.bias.copy_(0.5 * (lin.weight[0] - lin.weight).sum(1))
        lin.bias[:2] += torch.tensor([2.0, 1.99])
    model = nn.Sequential(nn.Flatten(), lin).eval()
    x, y = labelled(model, 32)
    right, nobody = torch.ones(len(y), dtype=torch.bool), torch.zeros(len(y), dtype=torch.bool)

    def run(seek, **kwargs):
        with seeded_rng(0):
            return apgd_run(model, x, y, 0.05, 5, seek=seek, full=nobody, **kwargs)

    whole, first = run(right, targets=9), run(right, targets=1)
    rest = run(first.pred == y, targets=9, skip_targets=1)
    fooled = [r.pred != y for r in (whole, first, rest)]
    assert fooled[1].any() and fooled[2].any() and not fooled[0].all()  # both parts fool some, not every image
    assert torch.equal(fooled[0], fooled[1] | fooled[2])
    assert torch.equal(whole.first[fooled[2]], rest.first[fooled[2]])


def test_autoattack_reuses_the_suite_apgd_verdicts_with_the_same_predictions(monkeypatch, cut_down):
    """With the suite's APGD-CE and APGD-T at torchattacks' settings (the report's default 10 steps x 1), AutoAttack
    runs only the APGD-T targets the suite did not try (4 to 9), and predicts as it does alone."""
    model = mlp()
    x, y = labelled(model)
    runs = []

    def spy(*args, **kwargs):
        runs.append((kwargs.get("loss"), kwargs.get("targets", 0), kwargs.get("skip_targets", 0)))
        return apgd_run(*args, **kwargs)

    monkeypatch.setattr(robust.threats, "apgd_run", spy)
    alone = predictions(model, x, y, ThreatSpec(EPS, threats=("autoattack",)))
    assert runs == [(None, 0, 0), (None, 9, 0)]  # APGD-CE, then APGD-T toward all 9 other classes
    runs.clear()
    together = predictions(model, x, y, ThreatSpec(EPS, threats=(*DEFAULT_THREATS, "autoattack", "aa_worst")))
    # the suite's APGD-CE, APGD-DLR and APGD-T toward 3 targets; then AutoAttack's APGD-T toward the other 6 only
    assert runs == [(None, 0, 0), ("dlr", 0, 0), (None, 3, 0), (None, 9, 3)]
    assert torch.equal(alone["autoattack"], together["autoattack"])
    assert ((together["aa_worst"] == y) == ((together["autoattack"] == y) & (together["pgd_worst"] == y))).all()


def test_the_pooled_tail_is_fab_t_and_square_on_every_batch_survivor(cut_down):
    """:func:`finish_autoattack` on two batches gives each survivor what torchattacks' FAB-T then Square give it on the
    pool of both batches' survivors (seeded with the spec's seed), and leaves every other prediction as it was."""
    model = mlp()
    x, y = labelled(model)
    spec = ThreatSpec(EPS, threats=("autoattack", "aa_worst", "pgd_worst"))
    done = [(x[i : i + 32], y[i : i + 32]) for i in (0, 32)]
    done = [(xb, yb, predictions(model, xb, yb, spec, pool_autoattack=True)) for xb, yb in done]
    before = [{k: v.clone() for k, v in preds.items()} for _, _, preds in done]
    standing = [preds[POOLED] for _, _, preds in done]
    assert all(s.any() for s in standing) and all(
        (yb[s] == p["autoattack"][s]).all() for (_, yb, p), s in zip(done, standing, strict=True)
    )
    finish_autoattack(model, spec, 10, done)
    assert all(POOLED not in preds for _, _, preds in done)
    pool_x = torch.cat([xb[s] for (xb, _, _), s in zip(done, standing, strict=True)])
    pool_y = torch.cat([yb[s] for (_, yb, _), s in zip(done, standing, strict=True)])
    *_, fab, square = robust.threats.autoattack_components(model, spec, 10)
    with seeded_rng(spec.seed):
        made = torchattacks.MultiAttack([fab, square])(pool_x, pool_y)
    with torch.no_grad():
        expected = model(made).argmax(1).split([int(s.sum()) for s in standing])
    for (_, yb, preds), old, s, mine in zip(done, before, standing, expected, strict=True):
        assert torch.equal(preds["autoattack"][s], mine) and torch.equal(preds["autoattack"][~s], old["autoattack"][~s])
        assert torch.equal(preds["pgd_worst"], old["pgd_worst"])
        fooled = s & (preds["autoattack"] != yb)
        assert torch.equal(preds["aa_worst"] == yb, (old["aa_worst"] == yb) & ~fooled)


def test_a_report_group_pools_autoattack_and_keeps_every_other_count(tmp_path, cut_down):
    """Three batches in groups of two: two journal shards; every count but AutoAttack's is the per-batch run's (the
    same seeds per batch), and AutoAttack's pooled counts are no higher than what its APGDs left standing."""
    model = mlp()
    x, y = labelled(model, 48)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    keys = ("clean", "pgd", "pgd_worst", "autoattack", "aa_worst")
    specs = [ThreatSpec(EPS, threats=keys)]

    def count(classes):
        return lambda g, batch, todo: batch_counts(model, keys, CPU, classes, g, batch, todo)

    journal = Journal(tmp_path, {"model": "digits"})
    pooled = sharded_counts(batches, specs, count(10), 1 + len(keys), World(CPU), journal, False, group=2)[0]
    single = sharded_counts(batches, specs, count(None), 1 + len(keys), World(CPU), progress=False)[0]
    assert sorted(p.name for p in (tmp_path / f"eps={EPS!r}").iterdir()) == ["shard-0-of-2.json", "shard-1-of-2.json"]
    assert pooled[:4].tolist() == single[:4].tolist() and pooled[0] == 48  # images, clean, pgd, pgd_worst
    apgds = sum(
        int((p["autoattack"] == yb).sum())
        for xb, yb in batches
        for p in [predictions(model, xb, yb, specs[0], pool_autoattack=True)]
    )
    assert pooled[4] <= apgds and pooled[5] <= min(pooled[3], pooled[4])


def test_a_loader_with_a_batch_sampler_groups_by_its_batches():
    """The group size comes from the images per batch, also for a DataLoader given a batch sampler (no batch_size)."""
    from torch.utils.data import DataLoader, TensorDataset

    from robust.evaluation.report import batch_size

    data = TensorDataset(torch.zeros(10, 1), torch.zeros(10))
    assert batch_size(DataLoader(data, batch_size=4)) == 4
    assert batch_size(DataLoader(data, batch_sampler=[[0, 1, 2], [3, 4, 5]])) == 3
    assert batch_size([(torch.zeros(5, 1), torch.zeros(5))]) == 5
