"""Square, the worst case's gradient-free part: opt-in by its queries, and what it finds that gradients cannot."""

from __future__ import annotations

import pytest
import torch
from test_early_exit import linear_batch, linear_model
from torch import nn

from robust.errors import RobustError
from robust.evaluation.render import markdown_table
from robust.evaluation.report import evaluate
from robust.threats import ThreatSpec, predictions

CHEAP = ("clean", "fgsm", "pgd", "apgd", "apgd_dlr", "apgd_t", "pgd_worst")


class Rounded(nn.Module):
    """A model with no gradient by construction: it sees its input rounded to quarters (masked gradients in their
    purest form; single-step adversarial training learns a softer version of the same thresholding)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


@pytest.fixture(scope="module")
def masked():
    """The rounded linear model and 64 images ``3×8×8`` in [0, 1] (float64) labelled with its own predictions, but
    the first 6 labelled otherwise (clean mistakes)."""
    model = Rounded(linear_model()).eval()
    x, _ = linear_batch(model)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:6] = (y[:6] + 1) % 4
    return model, x, y


def correct(preds: dict, y: torch.Tensor) -> dict[str, int]:
    return {k: int((v == y).sum()) for k, v in preds.items()}


def test_square_breaks_what_masked_gradients_hide(masked):
    model, x, y = masked
    without = correct(predictions(model, x, y, ThreatSpec(0.1, steps=5, threats=CHEAP)), y)
    spec = ThreatSpec(0.1, steps=5, threats=(*CHEAP, "square"), square_queries=100)
    preds = predictions(model, x, y, spec)
    got = correct(preds, y)
    # the gradient attacks move only by their random starts: most images stand
    assert without["clean"] == 58 and without["pgd_worst"] > without["clean"] / 2
    # Square, scoring queries, breaks most of them; the worst case takes it in, per example
    assert got["square"] < without["pgd_worst"] / 2 and got["pgd_worst"] <= got["square"]
    parts = [k for k in CHEAP if k != "pgd_worst"]
    assert {k: got[k] for k in parts} == {k: without[k] for k in parts}  # the other parts do not depend on Square
    assert torch.equal(
        preds["pgd_worst"] == y,
        (preds["square"] == y)
        & (preds["apgd_t"] == y)
        & (preds["pgd"] == y)
        & (preds["fgsm"] == y)
        & (preds["apgd"] == y)
        & (preds["apgd_dlr"] == y),
    )
    # a clean mistake is not attacked and stays wrong
    assert (preds["square"][:6] != y[:6]).all()


def test_square_in_the_cascade_runs_last_on_the_survivors(masked):
    model, x, y = masked
    spec = ThreatSpec(0.1, steps=5, threats=(*CHEAP, "square"), square_queries=100, cascade=True)
    chain = correct(predictions(model, x, y, spec), y)
    order = [chain[k] for k in spec.parts("pgd_worst")]
    assert order == sorted(order, reverse=True) and chain["pgd_worst"] == chain["square"] < chain["apgd_t"]


def test_square_is_a_part_only_with_its_queries():
    off, on = ThreatSpec(0.1), ThreatSpec(0.1, square_queries=10)
    assert "square" not in off.parts("pgd_worst") and on.parts("pgd_worst")[-1] == "square"
    assert off.previous("autoattack") == "apgd_t" and on.previous("autoattack") == "square"
    assert on.previous("square") == "apgd_t" and on.previous("fgsm") is None and on.previous("clean") is None
    with pytest.raises(RobustError, match="needs its queries"):
        ThreatSpec(0.1, threats=("square",))
    with pytest.raises(RobustError, match="0 \\(no Square\\) or more"):
        ThreatSpec(0.1, square_queries=-1)


def test_the_report_names_square_and_records_its_queries(masked):
    model, x, y = masked
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    plain = evaluate(model, loader, [0.1], steps=3, progress=False)
    with_square = evaluate(model, loader, [0.1], steps=3, progress=False, square_queries=50)
    assert "square" not in plain["rows"][0] and plain["square_queries"] == 0
    row = with_square["rows"][0]
    assert with_square["square_queries"] == 50 and row["pgd_worst"] <= row["square"] < plain["rows"][0]["pgd_worst"]
    table = markdown_table({**with_square, "model": {"spec": "rounded.pt"}, "data": {"name": "random"}})
    assert "Square-50" in table and "Worst case (FGSM, PGD, APGD-CE, -DLR, -T, Square)" in table
