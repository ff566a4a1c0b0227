"""MNIST recipes at eps 0.3 on ``mnist_net`` side by side, several seeds each: which one lands on every seed?

    python experiments/mnist_recipes.py [--recipes paper guard ema ...] [--seeds 0 1 2] [--limit 2000]
        [--aa-limit N] [--threads 1] [--work runs/mnist_recipes] [--name mnist_recipes]

Every recipe is ``configs/mnist_fgsm.yaml`` (Wong et al. 2020's FGSM-RS, the paper's run) or another config, with the
overrides of :data:`RECIPES`, trained once per seed through ``train.py`` (a process of its own, ``--threads`` torch
threads) and measured by ``evaluate.py report`` with the paper's protocol (PGD-50, step 0.01, 10 restarts; APGD-CE-100)
and the report's cheap worst case (FGSM, PGD-50×10, APGD-CE, APGD-DLR, APGD-T; per example) on ``--limit`` evenly
spaced test images; with ``--aa-limit``, AutoAttack (standard) and the worst case over everything on that many. The
checkpoint measured is the recipe's: ``last.ckpt`` (the final weights; with an EMA, the average), or ``best.ckpt``
for a recipe that chooses its epoch on held-out training images.

Per recipe: the mean and the **minimum** over its seeds of each figure, and its training time as a ratio to
``paper``'s mean in the same run (``paper`` is trained unless ``--no-reference``). Rows are kept in ``--work``/rows
as they finish (the machinery of ``experiments/mnist.py``), so the comparison runs in parts; ``--kept-only`` writes
the page from the rows already there. ``docs/results/<name>.md`` and ``.json`` are rewritten, with the page's
hand-written Reading section kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.common import machine, write_results  # noqa: E402
from experiments.mnist import (  # noqa: E402
    CHEAP_WORST,
    MNIST_TEST_IMAGES,
    PROTOCOL,
    evaluate,
    images_measured,
    pct,
    train,
    work_env,
)

PAPER = "configs/mnist_fgsm.yaml"
ROBUST = "configs/mnist_robust.yaml"  # the project's recipe: the paper's run with RECIPE_CHANGES
RECIPE_CHANGES = ("--data.init_args.val_size", "1000")  # tests/test_published.py holds the config to them
ROBUST_RECIPE = "heldout"
# name -> (config, train.py overrides, checkpoint measured: "last" or "best", what it is)
RECIPES: dict[str, tuple[str, list[str], str, str]] = {
    "paper": (PAPER, [], "last", "FGSM-RS as published (the time reference)"),
    "guard": (PAPER, ["--overfit_guard.action", "stop"], "last", "FGSM-RS, the guard stops a collapse"),
    "ema": (PAPER, ["--ema.decay", "0.999"], "last", "FGSM-RS, EMA of the weights (decay 0.999)"),
    ROBUST_RECIPE: (ROBUST, [], "best", "`mnist_robust.yaml`: FGSM-RS, epoch chosen on 1,000 held-out"),
    "guard_ema": (
        PAPER,
        ["--overfit_guard.action", "stop", "--ema.decay", "0.999"],
        "last",
        "FGSM-RS, guard stop and EMA 0.999",
    ),
    "rollback": (PAPER, ["--overfit_guard.action", "rollback"], "last", "FGSM-RS, the guard rolls back a collapse"),
    "heldout_ema": (
        PAPER,
        [*RECIPE_CHANGES, "--ema.decay", "0.999"],
        "best",
        "FGSM-RS, EMA 0.999, epoch chosen on 1,000 held-out",
    ),
    "heldout_lr": (
        PAPER,
        [*RECIPE_CHANGES, "--model.optimizer.init_args.lr", "0.0025"],
        "best",
        "FGSM-RS at half the peak lr (2.5e-3), epoch chosen on 1,000 held-out",
    ),
    "long_ema": (
        PAPER,
        ["--trainer.max_epochs", "15", "--ema.decay", "0.999"],
        "last",
        "FGSM-RS for 15 epochs (1.5x), EMA 0.999",
    ),
    "alpha1": (PAPER, ["--model.alpha", "0.3"], "last", "FGSM-RS with step eps (0.3) instead of 1.25·eps"),
    "eps35": (
        PAPER,
        ["--model.eps", "0.35", "--model.alpha", "0.4375", "--model.val_eps", "0.3"],
        "last",
        "FGSM-RS trained at eps 0.35 (step 1.25·eps), for eps 0.3",
    ),
    # A step that collapses on some seeds (Wong et al. 2020: FGSM-RS collapses as the step grows): the guard's real runs
    "a05": (PAPER, ["--model.alpha", "0.5"], "last", "FGSM-RS with step 0.5, guard warns"),
    "a05_stop": (
        PAPER,
        ["--model.alpha", "0.5", "--overfit_guard.action", "stop"],
        "last",
        "FGSM-RS with step 0.5, guard stops",
    ),
    "a05_rollback": (
        PAPER,
        ["--model.alpha", "0.5", "--overfit_guard.action", "rollback"],
        "last",
        "FGSM-RS with step 0.5, guard rolls back",
    ),
}
COLUMNS = (("clean", "Clean"), ("pgd", "PGD-50×10"), ("apgd", "APGD-CE-100"), ("pgd_worst", "Cheap worst case"))
AA_COLUMNS = (("autoattack", "AutoAttack"), ("worst", "Worst case"))


def measure(checkpoint: Path, name: str, args: argparse.Namespace, env: dict) -> dict:
    """The protocol and the cheap worst case on ``--limit`` test images; with ``--aa-limit``, AutoAttack and the
    worst case over everything on that many (``experiments/mnist.py``'s reports, kept in ``--work``)."""
    spec = argparse.Namespace(**{**vars(args), "autoattack": bool(args.aa_limit)})
    row = evaluate(checkpoint, name, [], spec, env, protocol=[*PROTOCOL, "--threats", *CHEAP_WORST])
    report = json.loads((Path(row["reports"][0]) / "report.json").read_text())["rows"][0]
    row["figures"]["pgd_worst"] = report["pgd_worst"]
    return row


def measured(name: str, args: argparse.Namespace) -> bool:
    """Whether ``name`` is trained and measured (as this run would measure it) in ``--work``: a ``--kept-only`` row."""
    parts = [f"{name}.train"]
    if args.aa_limit:
        parts.append(f"{name}.aa-limit{args.aa_limit}")
    if not args.aa_limit or images_measured(args.aa_limit) != images_measured(args.limit):
        parts.append(f"{name}.eval-limit{args.limit}")
    return all((args.work / "rows" / f"{part}.json").is_file() for part in parts)


def run_recipe(recipe: str, seed: int, args: argparse.Namespace, env: dict) -> dict:
    config, extra, which, _ = RECIPES[recipe]
    name = f"{recipe}_seed{seed}"
    trained = train(config, name, seed, [*extra, *args.train_args], args, env)
    checkpoint = Path(trained["checkpoint"] if which == "last" else trained["best"])
    row = {"name": name, "recipe": recipe, **trained, "measured": which}
    return row if args.train_only else {**row, **measure(checkpoint, name, args, env)}


def summary(rows: list[dict], reference_s: float | None) -> dict:
    """Mean and minimum over seeds of every figure, and the mean training time over the reference's."""
    out: dict = {"seeds": [r["seed"] for r in rows], "mean": {}, "min": {}}
    for key in {k for r in rows for k in r.get("figures", {})}:
        values = [r["figures"][key] for r in rows if r["figures"].get(key) is not None]
        if values:
            out["mean"][key], out["min"][key] = statistics.fmean(values), min(values)
    out["train_s"] = statistics.fmean(r["train_s"] for r in rows)
    out["time_ratio"] = out["train_s"] / reference_s if reference_s else None
    return out


def table(summaries: dict[str, dict], rows: list[dict], n: int, aa_n: int | None, line: str) -> str:
    columns = COLUMNS + (AA_COLUMNS if aa_n else ())
    head = "| recipe | seeds | " + " | ".join(f"{t} mean / min" for _, t in columns) + " | training × paper |"
    lines = [head, "|---|---|" + "---:|" * (len(columns) + 1)]
    for recipe, s in summaries.items():
        cells = [f"{pct(s['mean'].get(k))} / {pct(s['min'].get(k))}" for k, _ in columns]
        ratio = "-" if s["time_ratio"] is None else f"{s['time_ratio']:.2f}"
        seeds = " ".join(map(str, s["seeds"]))
        lines.append(f"| {recipe}: {RECIPES[recipe][3]} | {seeds} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", "Per seed:", "", "| run | " + " | ".join(t for _, t in columns) + " | training s |"]
    lines.append("|---|" + "---:|" * (len(columns) + 1))
    for r in rows:
        lines.append(
            f"| {r['name']} ({r['measured']}) | "
            + " | ".join(pct(r["figures"].get(k)) for k, _ in columns)
            + f" | {r['train_s']:.0f} |"
        )
    aa = f"; AutoAttack and the worst case on {aa_n:,}" if aa_n else ""
    return "\n".join([*lines, "", f"Accuracy (%) on {n:,} MNIST test images at eps 0.3 (L∞){aa}; {line}."])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=["paper", "guard", "ema", "heldout"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--limit", type=int, default=2000, help="test images of the protocol and the cheap worst case")
    parser.add_argument("--aa-limit", type=int, default=0, help="AutoAttack on this many test images (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--train-only", action="store_true", help="train (or keep) the runs, measure nothing")
    parser.add_argument(
        "--train-args", nargs=argparse.REMAINDER, default=[], help="extra train.py arguments (smoke tests), last"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "mnist_recipes")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--name", default="mnist_recipes")
    parser.add_argument("--fresh", action="store_true", help="train and measure every row again")
    parser.add_argument(
        "--kept-only", action="store_true", help="the table of the recipes x seeds already measured in --work, no runs"
    )
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="train `paper` only when --recipes names it (no time ratios)",
    )
    args = parser.parse_args(argv)
    if args.limit < 1 or args.aa_limit < 0 or min(args.seeds) < 0 or args.threads < 1:
        parser.error("--limit and --threads must be 1 or more, --aa-limit and --seeds 0 or more")
    args.limit = min(args.limit, MNIST_TEST_IMAGES)
    env = work_env(args)
    # paper first, the time reference (unless --no-reference), then the recipes asked for, each once
    recipes = list(dict.fromkeys((["paper"] if args.reference else []) + args.recipes))
    grid = [(recipe, seed) for recipe in recipes for seed in args.seeds]
    if args.kept_only:
        grid = [(recipe, seed) for recipe, seed in grid if measured(f"{recipe}_seed{seed}", args)]
        if not grid:
            parser.error(f"no row of these recipes and seeds is measured in {args.work}")
    rows = [run_recipe(recipe, seed, args, env) for recipe, seed in grid]
    if args.train_only:
        return {"rows": rows}
    paper = [r["train_s"] for r in rows if r["recipe"] == "paper"]
    reference = statistics.fmean(paper) if args.reference and paper else None
    summaries = {
        rc: summary([r for r in rows if r["recipe"] == rc], reference)
        for rc in dict.fromkeys(r["recipe"] for r in rows)
    }
    line = machine()
    command = "python experiments/mnist_recipes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(summaries, rows, rows[0]["n"], rows[0].get("aa_n"), line)
    page = "\n".join(
        [
            "# MNIST recipes at eps 0.3: which lands on every seed",
            "",
            "Written by `experiments/mnist_recipes.py` (rerun it; only the Reading section is by hand). Each recipe",
            "trains `mnist_net` once per seed; each model is measured by `evaluate.py report`: the paper's protocol",
            "(PGD-50, step 0.01, 10 restarts; APGD-CE-100) and the report's cheap worst case (FGSM, PGD-50×10,",
            "APGD-CE, APGD-DLR, APGD-T, per example). Training time is each recipe's mean over the paper run's mean,",
            "same run, same threads.",
            "",
            f"    {command.strip()}",
            "",
            text,
            "",
        ]
    )
    doc = {"machine": line, "command": command.strip(), "rows": rows, "summaries": summaries}
    write_results(args.out, args.name, page, doc)
    print(text)
    return doc


if __name__ == "__main__":
    main()
