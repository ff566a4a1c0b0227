"""MNIST in the L2 threat model: train ``configs/mnist_l2.yaml`` and a clean-trained twin, evaluate them and the L∞
FGSM-RS model of ``experiments/mnist.py`` at L2 eps 2.0 with one report, write ``docs/results/mnist_l2.md`` (+ JSON).

    python experiments/mnist_l2.py [--eps 2.0] [--threads 1] [--no-autoattack]

Rows: ours L2 PGD-10 (``configs/mnist_l2.yaml``), the clean twin (``configs/mnist_fgsm.yaml`` with ``--model.adv_ratio
0``: the same network, optimizer and schedule, no attack) and the L∞-trained FGSM-RS model (its seed-0 run, shared
with ``experiments/mnist.py`` through ``--work``) evaluated in L2, a cross-norm evaluation. Protocol: L2 PGD-50 with
the registry's step 2.5·eps/50 and 10 restarts and APGD-CE-100 (L2) on all 10,000 test images; AutoAttack (standard,
L2), the cheap worst case and the worst case over every attack on ``--aa-limit`` of them. Runs and reports are kept
in ``--work`` as in ``experiments/mnist.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.common import write_results  # noqa: E402
from experiments.mnist import evaluate, pct, train, work_env  # noqa: E402
from robust.machine import machine  # noqa: E402

COLUMNS = (
    ("clean", "Clean"),
    ("pgd", "L2 PGD-50×10"),
    ("apgd", "L2 APGD-CE-100"),
    ("aa_pgd_worst", "Cheap worst†"),
    ("autoattack", "AutoAttack-L2†"),
    ("worst", "Worst case†"),
)
RUNS = (
    ("l2", "configs/mnist_l2.yaml", [], "ours, L2 PGD-10 at eps 2.0 (`configs/mnist_l2.yaml`)"),
    ("clean", "configs/mnist_fgsm.yaml", ["--model.adv_ratio", "0"], "clean-trained twin"),
    ("fgsm_seed0", "configs/mnist_fgsm.yaml", [], "ours, L∞ FGSM-RS at eps 0.3, evaluated in L2"),
)


def protocol(eps: float) -> list[str]:
    """The report's arguments: L2 PGD-50×10 at the registry's step, APGD-CE-100 × 1, their worst case."""
    return [
        "--norm",
        "l2",
        "--eps",
        str(eps),
        "--steps",
        "50",
        "--restarts",
        "10",
        "--apgd-steps",
        "100",
        "--apgd-restarts",
        "1",
        "--threats",
        "clean",
        "pgd",
        "apgd",
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eps", type=float, default=2.0, help="L2 budget of the evaluation (default 2.0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default torch's)")
    parser.add_argument("--no-autoattack", dest="autoattack", action="store_false", help="skip AutoAttack")
    parser.add_argument("--limit", type=int, help="evaluate this many test images only (smoke tests)")
    parser.add_argument("--aa-limit", type=int, default=500, help="AutoAttack on this many test images (default 500)")
    parser.add_argument("--train-only", action="store_true", help="train (or keep) the runs, evaluate nothing")
    parser.add_argument(
        "--train-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra train.py arguments for every run (smoke tests), last on the line",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "mnist", help="logs, checkpoints, reports")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="where mnist_l2.md/json go")
    parser.add_argument("--fresh", action="store_true", help="measure every row again")
    args = parser.parse_args(argv)
    if not args.eps > 0:
        parser.error("--eps must be > 0")
    env = work_env(args)
    rows = []
    for name, config, extra, label in RUNS:
        trained = train(config, name, 0, [*extra, *args.train_args], args, env)
        row = {"name": name, "label": label, **trained, "figures": {}}
        if not args.train_only:
            row.update(
                evaluate(Path(trained["checkpoint"]), f"{name}-l2eps{args.eps:g}", [], args, env, protocol(args.eps))
            )
        rows.append(row)
    if args.train_only:
        return {"rows": rows}
    line = machine()
    command = ("python experiments/mnist_l2.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    lines = ["| Model | " + " | ".join(t for _, t in COLUMNS) + " | Training |", "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for row in rows:
        minutes = f"{row['train_s'] / 60:.1f} min"
        lines.append(
            f"| {row['label']} | " + " | ".join(pct(row["figures"].get(k)) for k, _ in COLUMNS) + f" | {minutes} |"
        )
    n = rows[0]["n"]
    text = "\n".join(
        [
            "# MNIST in L2, eps " + f"{args.eps:g}",
            "",
            "Written by `experiments/mnist_l2.py` (rerun it; only the Reading section is by hand). One",
            "`evaluate.py report --norm l2` per",
            f"model: L2 PGD-50 (step 2.5·eps/50) with 10 restarts and APGD-CE-100 on {n:,} test images (evenly spaced;",
            "all 10,000 without `--limit`); † AutoAttack",
            "(standard, L2, torchattacks), the report's cheap worst case and the per-example worst case over every",
            "attack on 500 evenly spaced test images. The L∞ row is a cross-norm evaluation (the report's header says",
            "so).",
            "",
            f"    {command}",
            "",
            *lines,
            "",
            f"Accuracy (%) at L2 eps {args.eps:g}, measured on {line}.",
            "",
        ]
    )
    doc = {"machine": line, "command": command, "eps": args.eps, "rows": rows}
    write_results(args.out, "mnist_l2", text, doc)
    print(text)
    return doc


if __name__ == "__main__":
    main()
