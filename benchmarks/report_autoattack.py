"""The report with AutoAttack against torchattacks' AutoAttack alone (issue #41): ``python benchmarks/run.py --only
report``.

On ``report_n`` evenly spaced MNIST test images of the authors' ``fgsm.pth`` (Wong et al. 2020, ``mnist_net``) at
eps 0.3, in interleaved rounds: ``robust.evaluation.report.evaluate`` with every default threat and ``autoattack``
(what ``evaluate.py report --autoattack`` computes, in batches of its default ``--batch-size``), and torchattacks'
standard ``AutoAttack`` (seed 0) alone on the same images, once as one batch and once over the same batches. Keys:
the time ratios and both AutoAttack figures."""

from __future__ import annotations

from unittest import mock

import torch
from torch import Tensor, nn

import robust.threats
from benchmarks.suite import MNIST_EPS, autoattack_reference, cut_down, mnist_test
from benchmarks.timing import Row, Sizes, time_interleaved
from robust.data.eval_data import DEFAULT_BATCH_SIZE
from robust.evaluation.report import evaluate

AUTOATTACK_COMPONENTS = robust.threats.autoattack_components
QUICK_BATCH = 2  # --quick: 4 images in 2 batches, so the pooling across batches still runs


def bench_report_autoattack(model: nn.Module, name: str, sizes: Sizes, run: dict) -> tuple[list[Row], dict]:
    """Rows and keys (``report_autoattack_*``) of the report against torchattacks' AutoAttack on ``model`` (eval
    mode, on its device; ``name`` for the table). ``--quick``: 4 images, AutoAttack cut to 2 iterations and 10
    Square queries on both sides (a smoke run, not AutoAttack)."""
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in mnist_test(sizes.report_n))
    size = QUICK_BATCH if sizes.quick else DEFAULT_BATCH_SIZE
    batches = list(zip(x.split(size), y.split(size), strict=True))
    out: dict[str, float] = {}

    def components(*args, **kwargs) -> list:
        return cut_down(AUTOATTACK_COMPONENTS(*args, **kwargs), sizes.quick)

    def ours() -> None:
        with mock.patch.object(robust.threats, "autoattack_components", components):
            results = evaluate(model, batches, [MNIST_EPS], sizes.suite_steps, autoattack=True, progress=False)
        out["report"] = results["rows"][0]["autoattack"]

    def theirs(parts: list[tuple[Tensor, Tensor]], key: str) -> None:
        correct = 0
        for xb, yb in parts:
            attack = autoattack_reference(model, MNIST_EPS, sizes.quick)
            with torch.no_grad():
                correct += int((model(attack(xb, yb)).argmax(1) == yb).sum())
        out[key] = correct / len(y)

    fns = {
        "report": ours,
        "torchattacks": lambda: theirs([(x, y)], "torchattacks"),
        "torchattacks_batched": lambda: theirs(batches, "torchattacks_batched"),
    }
    t = time_interleaved(fns, **run)
    label, variant = f"report --autoattack, MNIST {name}", f"eps {MNIST_EPS:g}, {len(y)} images"
    rows = [
        Row(label, variant, t["report"], len(y), t["report"] / t["torchattacks"], "<= 1.2"),
        Row("torchattacks AutoAttack, one batch", variant, t["torchattacks"], len(y)),
        Row(f"torchattacks AutoAttack, batches of {size}", variant, t["torchattacks_batched"], len(y)),
    ]
    keys = {
        "report_autoattack_over_torchattacks": t["report"] / t["torchattacks"],
        "report_autoattack_over_torchattacks_batched": t["report"] / t["torchattacks_batched"],
        "report_autoattack_seconds": t,
        "report_autoattack_accuracy": dict(out),
        "report_autoattack_minus_torchattacks_points": 100 * (out["report"] - out["torchattacks"]),
        "report_autoattack_n": len(y),
        "report_autoattack_batch": size,
    }
    return rows, keys
