"""Which AutoAttack component breaks what the cheap suite misses, and what the threat suite costs with and without
early exit: ``python benchmarks/autoattack_components.py [--eps 0.02 0.03] [--n 200] [--steps 20]``.

Model: the reference digits ResNet18 (:func:`benchmarks.digits_model.train_digits_model`: ResNet18, clean
training, 3 epochs, seed 0), evaluated on the first ``--n`` held-out digits (3×32×32 in [0, 1]), L-inf; or, with
``--model mnist``, the authors' MNIST ``fgsm.pth`` (Wong et al. 2020) on ``--n`` evenly spaced test images.

1. The cheap suite (``--cheap apgd``: FGSM, PGD-10, APGD-CE-10; ``--cheap pgd_worst``: the whole cheap worst case,
   with APGD-DLR and APGD-T; as :mod:`robust.threats` runs them, cascade) leaves survivors.
2. On those survivors, each AutoAttack component of torchattacks, alone, with ``--steps`` iterations (AutoAttack's
   standard version uses 100, and 5,000 Square queries: ``--steps`` / ``--square-queries`` scale that down to fit a
   shared CPU): APGD-CE, APGD-DLR, APGD-T (9 target classes), FAB-T (9 target classes), Square. And our own
   APGD-DLR and APGD-T with 3 targets (:func:`robust.attacks.apgd`), the candidates for the threat suite.
   A column counts the survivors it fools; ``only`` counts those no other torchattacks component fools.
3. The whole default threat suite on the same images: every example every step (``early_exit=False``), early exit,
   and early exit with the cascade; seconds and ``pgd_worst`` / ``jpeg_worst``.

Prints the tables (markdown) and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchattacks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.digits_model import train_digits_model  # noqa: E402
from benchmarks.suite import MNIST_MODEL, mnist_test  # noqa: E402
from robust.attacks import apgd, seeded_rng  # noqa: E402
from robust.data.modules import Digits  # noqa: E402
from robust.machine import machine  # noqa: E402
from robust.models.resolve import external_model  # noqa: E402
from robust.threats import DEFAULT_THREATS, ThreatSpec, predictions  # noqa: E402


def components(model, eps: float, steps: int, square_queries: int) -> dict:
    """name -> a function (x, y) -> adversarial images; torchattacks' with AutoAttack's standard settings but the
    iteration counts, and our APGD-DLR / APGD-T-3."""
    seed = 0
    return {
        "APGD-CE": torchattacks.APGD(model, eps=eps, steps=steps, loss="ce", seed=seed),
        "APGD-DLR": torchattacks.APGD(model, eps=eps, steps=steps, loss="dlr", seed=seed),
        "APGD-T": torchattacks.APGDT(model, eps=eps, steps=steps, n_classes=10, seed=seed),
        "FAB-T": torchattacks.FAB(model, eps=eps, steps=steps, multi_targeted=True, n_classes=10, seed=seed),
        "Square": torchattacks.Square(model, eps=eps, n_queries=square_queries, seed=seed),
        "ours APGD-DLR": lambda x, y: _ours(model, x, y, eps, steps, "dlr", 0),
        "ours APGD-T-3": lambda x, y: _ours(model, x, y, eps, steps, "dlr", 3),
    }


def _ours(model, x, y, eps, steps, loss, targets):
    with seeded_rng(0):
        return apgd(model, x, y, eps, steps, loss=loss, targets=targets, early_exit=True)


def measure_components(model, x, y, eps: float, steps: int, square_queries: int, cheap: str = "apgd") -> dict:
    # in a cascade, a part's predictions are those after it and the parts before: apgd's after FGSM, PGD and APGD-CE
    spec = ThreatSpec(eps, steps=10, threats=("clean", cheap), cascade=True)
    t0 = time.perf_counter()
    preds = predictions(model, x, y, spec)
    cheap_s = time.perf_counter() - t0
    alive = preds[cheap] == y
    xs, ys = x[alive], y[alive]
    row = {
        "eps": eps,
        "n": len(y),
        "clean": int((preds["clean"] == y).sum()),
        "cheap_survivors": int(alive.sum()),
        "cheap_s": round(cheap_s, 1),
        "fooled": {},
        "seconds": {},
    }
    fooled = {}
    for name, attack in components(model, eps, steps, square_queries).items():
        t0 = time.perf_counter()
        with torch.random.fork_rng():
            adv = attack(xs, ys) if len(xs) else xs
        model.zero_grad(set_to_none=True)  # some torchattacks components backpropagate into the weights
        row["seconds"][name] = round(time.perf_counter() - t0, 1)
        with torch.no_grad():
            fooled[name] = model(adv).argmax(1) != ys if len(xs) else torch.zeros(0, dtype=torch.bool)
        row["fooled"][name] = int(fooled[name].sum())
    reference = [k for k in fooled if not k.startswith("ours")]
    union = torch.stack([fooled[k] for k in reference]).any(0) if len(xs) else torch.zeros(0, dtype=torch.bool)
    row["fooled_by_any"] = int(union.sum())
    row["only"] = (
        {k: int((fooled[k] & ~torch.stack([fooled[o] for o in reference if o != k]).any(0)).sum()) for k in reference}
        if len(xs)
        else {}
    )
    return row


def measure_cost(model, x, y, eps: float) -> list[dict]:
    rows = []
    for label, kw in [
        ("every example, every step", {"early_exit": False}),
        ("early exit", {}),
        ("early exit + cascade", {"cascade": True}),
    ]:
        spec = ThreatSpec(eps, steps=10, threats=DEFAULT_THREATS, **kw)
        t0 = time.perf_counter()
        preds = predictions(model, x, y, spec)
        seconds = time.perf_counter() - t0
        acc = {k: round((preds[k] == y).float().mean().item(), 4) for k in ("clean", "pgd_worst", "jpeg_worst")}
        rows.append({"eps": eps, "mode": label, "seconds": round(seconds, 1), **acc})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=["digits", "mnist"],
        default="digits",
        help="the reference digits ResNet18, or the authors' MNIST fgsm.pth (--mnist-model)",
    )
    parser.add_argument("--mnist-model", default=str(MNIST_MODEL))
    parser.add_argument(
        "--cheap",
        choices=["apgd", "pgd_worst"],
        default="apgd",
        help="whose survivors the components attack: FGSM, PGD, APGD-CE, or the whole cheap worst case",
    )
    parser.add_argument("--eps", type=float, nargs="+", help="default 0.02 0.03 (digits), 0.3 (mnist)")
    parser.add_argument("--n", type=int, default=200, help="held-out digits (of 360) or MNIST test images")
    parser.add_argument("--steps", type=int, default=20, help="iterations of each AutoAttack component")
    parser.add_argument("--square-queries", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-cost", action="store_true", help="no threat-suite cost table")
    parser.add_argument("--skip-components", action="store_true", help="no component table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.model == "mnist":
        model = external_model(args.mnist_model, "state_dict", arch="mnist_net").eval()
        x, y = mnist_test(args.n)
    else:
        model = train_digits_model()
        dm = Digits()
        dm.setup()
        x, y = (t[: args.n] for t in dm.val_set.tensors)
    train_s = time.perf_counter() - t0
    args.eps = args.eps or ([0.3] if args.model == "mnist" else [0.02, 0.03])
    record = {
        "machine": machine(),
        "torch": torch.__version__,
        "torchattacks": torchattacks.__version__,
        "threads": args.threads,
        "train_s": round(train_s, 1),
        "args": vars(args),
        "components": [],
        "cost": [],
    }
    for eps in args.eps:
        if not args.skip_components:
            record["components"].append(
                measure_components(model, x, y, eps, args.steps, args.square_queries, args.cheap)
            )
        if not args.skip_cost:
            record["cost"].extend(measure_cost(model, x, y, eps))

    if record["components"]:
        names = list(record["components"][0]["fooled"])
        print(f"| eps | n | clean | cheap-suite survivors | {' | '.join(names)} | any component |")
        print("|---" * (5 + len(names)) + "|")
        for r in record["components"]:
            cells = [f"{r['fooled'][k]} ({r['only'].get(k, '-')}) {r['seconds'][k]} s" for k in names]
            print(
                f"| {r['eps']} | {r['n']} | {r['clean']} | {r['cheap_survivors']} | {' | '.join(cells)} | "
                f"{r['fooled_by_any']} |"
            )
    if record["cost"]:
        print("\n| eps | threat suite | seconds | clean | pgd_worst | jpeg_worst |\n|---|---|---|---|---|---|")
        for r in record["cost"]:
            print(
                f"| {r['eps']} | {r['mode']} | {r['seconds']} | {r['clean']} | {r['pgd_worst']} | {r['jpeg_worst']} |"
            )
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
