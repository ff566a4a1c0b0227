"""Reproduce Wong, Rice & Kolter 2020's MNIST table: train the papers' two runs, evaluate them and the authors' released
models with the same report, and write ``docs/results/mnist.md`` (+ ``mnist.json``).

    python experiments/mnist.py [--seeds 0 1 2] [--heldout-seeds 0 1 2] [--pgd-epochs 100] [--threads 1]
                                [--no-autoattack] [--no-authors] [--limit N] [--name mnist]

Rows: ours, ``configs/mnist_fgsm.yaml`` (FGSM with a random start, 10 epochs) once per seed, then their mean and
range; the same recipe with ``--val-size`` training images held out for validation, once per ``--heldout-seeds``,
its final weights and its most robust epoch by the held-out validation (the checkpoint ``train.py`` keeps; it never
sees a test image), each as the mean and range over seeds; the authors' ``fgsm.pth``; ours,
``configs/mnist_pgd.yaml`` (PGD-40, ``--pgd-epochs`` of the paper's 100; 0 skips it); the authors' ``pgd_madry.pth``.
Each model but the held-out runs' best is the run's final weights (``last.ckpt``: the paper evaluates the model its
script saves last) and is measured by ``evaluate.py report`` with the paper's protocol
(``evaluate_mnist.py``): eps 0.3, PGD-50 with step 0.01 and 10 random restarts (an example counts as broken if any
restart breaks it), on all 10,000 test images, with APGD-CE as AutoAttack runs it (100 steps); then, on ``--aa-limit``
of them, the report's cheap worst case (FGSM, PGD-50×10, APGD-CE, APGD-DLR, APGD-T), AutoAttack (standard) and the
per-example worst case over all of them. The authors'
models are plain ``mnist_net`` state dicts, read with ``weights_only=True`` from ``--authors`` (downloaded there from
their repository when missing, sha256-checked).

Every row is kept in ``--work``/rows as soon as it is done, so a killed run picks up where it stopped (``--fresh``
starts over). Figures are from this machine (its line heads the table): a training trajectory moves with the CPU and
thread count, so the seeds' range is part of the result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.common import machine, write_results  # noqa: E402
from robust.files import atomic_write_files, sha256_hex  # noqa: E402

AUTHORS_URL = "https://github.com/locuslab/fast_adversarial/raw/master/MNIST/models/{name}.pth"
AUTHORS_SHA256 = {
    "fgsm": "07536ed24c714dac89507d38ffc0090f110de3cd70c40d02d8d56491e187905b",
    "pgd_madry": "877b74b1d2bf22a2ea958f7d8c892c02710e7c84627d14b44b1c67046fcd5a79",
}
# The paper's own figures (clean, PGD at eps 0.3 with 50 steps × 10 restarts), as the AutoAttack leaderboard
# (fra31/auto-attack README, MNIST L-inf) quotes Wong et al. 2020; the PGD-40 row's are not quoted there.
PAPER = {"fgsm": {"clean": 0.9850, "pgd": 0.8877, "autoattack": 0.8293}}
# evaluate_mnist.py's PGD (50 steps of 0.01, 10 restarts), AutoAttack's standard APGD-CE (100 steps, 1 restart).
PROTOCOL = [
    "--eps",
    "0.3",
    "--steps",
    "50",
    "--alpha",
    "0.01",
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
# On the AutoAttack subset: the report's cheap worst case and its parts (an argument given last wins).
CHEAP_WORST = ("clean", "pgd", "apgd", "pgd_worst")
MNIST_TEST_IMAGES = 10_000  # the official test split
COLUMNS = (
    ("clean", "Clean"),
    ("pgd", "PGD-50×10"),
    ("apgd", "APGD-CE-100"),
    ("aa_pgd_worst", "Cheap worst case†"),
    ("autoattack", "AutoAttack†"),
    ("worst", "Worst case†"),
)


def authors_model(name: str, folder: Path) -> Path:
    """The authors' ``<name>.pth`` in ``folder``, downloaded from their repository when missing; sha256-checked."""
    path = folder / f"{name}.pth"
    if not path.is_file():
        import torch.hub

        folder.mkdir(parents=True, exist_ok=True)
        url = AUTHORS_URL.format(name=name)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except OSError as exc:
            raise SystemExit(f"error: {path} is missing and {url} could not be downloaded ({exc})") from None
    if sha256_hex(path.read_bytes()) != AUTHORS_SHA256[name]:
        raise SystemExit(f"error: {path} is not the authors' {name}.pth (sha256 differs)")
    return path


def work_env(args: argparse.Namespace) -> dict:
    """The environment of the runs' processes (``--threads`` torch threads each, this process too), after making
    ``--work``/rows."""
    env = dict(os.environ)
    if args.threads:
        import torch

        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    (args.work / "rows").mkdir(parents=True, exist_ok=True)
    return env


def run(cmd: list[str], env: dict, log: Path) -> float:
    """Run ``cmd`` (output to ``log``); its wall time in seconds; exit with its log's tail when it fails."""
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({code}); see {log}:\n{log.read_text()[-2000:]}")
    return time.perf_counter() - start


def kept(name: str, args: argparse.Namespace, make) -> dict:
    """``make()``'s result, kept in ``--work``/rows/``name``.json: a rerun (without ``--fresh``) reads it back."""
    path = args.work / "rows" / f"{name}.json"
    if path.is_file() and not args.fresh:
        return json.loads(path.read_text())
    result = make()
    atomic_write_files(path.parent, {path.name: (json.dumps(result, indent=2) + "\n").encode()})
    print(f"KEPT {name} {json.dumps(result)}", flush=True)
    return result


def train(config: str, name: str, seed: int, extra: list[str], args: argparse.Namespace, env: dict) -> dict:
    """Train ``config`` under ``seed`` (or take the run kept in ``--work``): its final checkpoint and wall time."""

    def fit() -> dict:
        save_dir = args.work / "logs"
        cmd = [
            sys.executable,
            "train.py",
            "fit",
            "--config",
            config,
            "--seed_everything",
            str(seed),
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
            "--trainer.logger.init_args.name",
            name,
            "--trainer.logger.init_args.version",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        ]
        seconds = run(cmd, env, args.work / f"{name}.train.log")
        folder = save_dir / name / "version_0" / "checkpoints"
        best = (save_dir / name / "best.ckpt").resolve()  # train.py's link to the run's most robust checkpoint
        return {
            "config": config,
            "seed": seed,
            "checkpoint": str(folder / "last.ckpt"),
            "best": str(best),
            "train_s": round(seconds, 1),
        }

    return kept(f"{name}.train", args, fit)


def images_measured(limit: int | None) -> int:
    """How many test images a ``--limit`` or ``--aa-limit`` measures (``None``: all of them)."""
    return min(limit or MNIST_TEST_IMAGES, MNIST_TEST_IMAGES)


def evaluate(
    model: Path, name: str, arch: list[str], args: argparse.Namespace, env: dict, protocol: list[str] = PROTOCOL
) -> dict:
    """AutoAttack (and the worst case over every attack) on ``--aa-limit`` test images, evenly spaced, and the
    paper's protocol on all of them (``--limit``: that many; AutoAttack's report when it covers as many); each
    report kept in ``--work`` under a name that says how many images it measured, so a run with another limit
    measures again instead of reading it back."""

    def report(kind: str, extra: list[str]) -> dict:
        out = args.work / "reports" / f"{name}-{kind}"
        cmd = [
            sys.executable,
            "evaluate.py",
            "report",
            "--model",
            str(model),
            *arch,
            "--data",
            "mnist",
            *protocol,
            "--batch-size",
            "500",
            "--out",
            str(out),
            *extra,
        ]
        seconds = run(cmd, env, args.work / f"{name}-{kind}.report.log")
        result = json.loads((out / "report.json").read_text())
        return {"row": result["rows"][0], "n": result["n"], "eval_s": round(seconds, 1), "report": str(out)}

    aa = None
    if args.autoattack:
        extra = ["--autoattack", "--limit", str(args.aa_limit), "--threats", *CHEAP_WORST]
        aa = kept(f"{name}.aa-limit{args.aa_limit}", args, lambda: report(f"autoattack-limit{args.aa_limit}", extra))
    if aa is not None and images_measured(args.aa_limit) == images_measured(args.limit):
        full = aa  # AutoAttack's report ran the protocol's threats on the same images
    else:
        limited = f"-limit{args.limit}" if args.limit else ""
        only = ["--limit", str(args.limit)] if args.limit else []
        full = kept(f"{name}.eval{limited}", args, lambda: report(f"protocol{limited}", only))
    figures = {key: full["row"].get(key) for key in ("clean", "pgd", "apgd")}
    out = {"figures": figures, "n": full["n"], "eval_s": full["eval_s"], "reports": [full["report"]]}
    if aa is not None:
        figures.update(
            autoattack=aa["row"]["autoattack"], worst=aa["row"]["aa_worst"], aa_pgd_worst=aa["row"]["pgd_worst"]
        )
        out.update(aa_n=aa["n"], aa_eval_s=aa["eval_s"])
        if full is not aa:
            out["reports"].append(aa["report"])
    return out


def ours(config: str, name: str, seed: int, extra: list[str], args, env) -> dict:
    trained = train(config, name, seed, extra, args, env)
    row = {"name": name, "source": f"ours, {config}", **trained, "figures": {}}
    return row if args.train_only else {**row, **evaluate(Path(trained["checkpoint"]), name, [], args, env)}


def heldout(seed: int, args, env) -> list[dict]:
    """``configs/mnist_fgsm.yaml`` with ``--val-size`` training images held out to validate on: two rows, its final
    weights (``{name}``) and its most robust checkpoint by that validation (``{name}_best``)."""
    name, extra = f"fgsm_heldout_seed{seed}", ["--data.init_args.val_size", str(args.val_size), *args.train_args]
    last = ours("configs/mnist_fgsm.yaml", name, seed, extra, args, env)
    if args.train_only:
        return [last]
    best = {**last, "name": f"{name}_best", "checkpoint": last["best"], "figures": {}}
    return [last, {**best, **evaluate(Path(last["best"]), f"{name}_best", [], args, env)}]


def theirs(name: str, args, env) -> dict:
    path = authors_model(name, args.authors)
    row = {
        "name": f"authors_{name}",
        "source": f"authors' {name}.pth",
        "seed": None,
        "checkpoint": str(path),
        "train_s": None,
        "figures": {},
    }
    return row if args.train_only else {**row, **evaluate(path, f"authors_{name}", ["--arch", "mnist_net"], args, env)}


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def mean_row(rows: list[dict], name: str) -> dict:
    """Mean and range over seeds of each figure and of the training time, as row ``name``."""
    out = {"name": name, "seeds": [r["seed"] for r in rows], "figures": {}, "range": {}}
    for key, _ in COLUMNS:
        values = [r["figures"][key] for r in rows if r["figures"].get(key) is not None]
        if values:
            out["figures"][key] = statistics.fmean(values)
            out["range"][key] = (min(values), max(values))
    out["train_s"] = statistics.fmean(r["train_s"] for r in rows)
    return out


def seed_rows(rows: list[dict], prefix: str, suffix: str = "") -> list[dict]:
    """The rows of one recipe, one per seed: named ``prefix<seed>suffix``."""
    return [
        r
        for r in rows
        if r["name"].startswith(prefix)
        and r["name"].endswith(suffix)
        and r["name"][len(prefix) : len(r["name"]) - len(suffix)].isdigit()
    ]


def table(rows: list[dict], means: dict[str, dict], line: str) -> str:
    head = "| Model | " + " | ".join(title for _, title in COLUMNS) + " | Training | Paper (clean / PGD / AA) |"
    lines = [head, "|---|" + "---:|" * (len(COLUMNS) + 2)]

    def add(label: str, row: dict, paper: str = "", spread: dict | None = None) -> None:
        cells = []
        for key, _ in COLUMNS:
            value = pct(row["figures"].get(key))
            if spread and key in spread:
                value += f" ({pct(spread[key][0])}–{pct(spread[key][1])})"
            cells.append(value)
        minutes = "-" if row.get("train_s") is None else f"{row['train_s'] / 60:.1f} min"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {minutes} | {paper} |")

    paper = PAPER["fgsm"]
    paper_fgsm = f"{pct(paper['clean'])} / {pct(paper['pgd'])} / {pct(paper['autoattack'])}"
    for row in seed_rows(rows, "fgsm_seed"):
        add(f"ours FGSM-RS, seed {row['seed']}", row)
    if "fgsm_mean" in means:
        mean = means["fgsm_mean"]
        add(f"**ours FGSM-RS, mean of {len(mean['seeds'])} seeds** (range)", mean, paper_fgsm, mean["range"])
    for key, what in (("heldout_mean", "final weights"), ("heldout_best_mean", "most robust epoch by held-out val")):
        if key in means:
            mean = means[key]
            n_val = mean["val_size"]
            add(
                f"ours FGSM-RS, {n_val:,} training images held out: {what}, mean of {len(mean['seeds'])} (range)",
                mean,
                "",
                mean["range"],
            )
    for row in rows:
        if row["name"] == "authors_fgsm":
            add("authors' `fgsm.pth`", row, paper_fgsm)
        elif row["name"].startswith("pgd_"):
            add(f"ours PGD-40, {row['epochs']} of 100 epochs", row)
        elif row["name"] == "authors_pgd_madry":
            add("authors' `pgd_madry.pth` (100 epochs)", row)
    n = rows[0]["n"] if rows else 0
    return "\n".join([*lines, "", f"Accuracy (%) on {n:,} MNIST test images at eps 0.3 (L∞), measured on {line}."])


def document(text: str, command: str, n: int, aa_n: int | None) -> str:
    """``docs/results/mnist.md``: what was run (``n`` images for the protocol, ``aa_n`` for AutoAttack), the command,
    the table."""
    aa = "all" if aa_n == n else f"{aa_n:,} evenly spaced" if aa_n else "none of the"
    return "\n".join(
        [
            "# MNIST: Wong, Rice & Kolter 2020 reproduced",
            "",
            "Written by `experiments/mnist.py` (rerun it; only the Reading section is by hand). Each row is one model",
            "measured by the same `evaluate.py report` with the paper's protocol",
            "(`MNIST/evaluate_mnist.py` of locuslab/fast_adversarial):",
            "eps 0.3, PGD-50 with step 0.01 and 10 random restarts (an image counts as broken when any restart breaks",
            f"it) and APGD-CE-100 (AutoAttack's first attack) on {n:,} test images (evenly spaced; all 10,000 without",
            f"`--limit`); † on {aa} test images (`--aa-limit`; AutoAttack's Square costs 20 min to hours per",
            "model on all 10,000 on a CPU): the report's cheap worst case (FGSM, PGD,",
            "APGD-CE, APGD-DLR, APGD-T), AutoAttack (standard, torchattacks) and the per-example worst case over all",
            "of them. Ours are the final weights (`last.ckpt`) of",
            "`configs/mnist_fgsm.yaml` and `configs/mnist_pgd.yaml`, except the held-out rows' most robust epoch",
            "(`best.ckpt`, chosen on training images held out from training, never on a test image); the authors' are",
            "their released state dicts,",
            "loaded as `--arch mnist_net`. The paper's column is its own figures as the AutoAttack leaderboard",
            "(fra31/auto-attack) quotes them: clean and PGD from the paper, AutoAttack measured by Croce & Hein.",
            "",
            f"    {command}",
            "",
            text,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the FGSM-RS row")
    parser.add_argument(
        "--heldout-seeds",
        type=int,
        nargs="*",
        default=[0, 1, 2],
        help="seeds of the FGSM-RS runs that validate on held-out training images (none: skip)",
    )
    parser.add_argument("--val-size", type=int, default=1000, help="training images those runs hold out")
    parser.add_argument("--pgd-epochs", type=int, default=100, help="epochs of the PGD-40 row (paper: 100; 0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default torch's)")
    parser.add_argument("--no-autoattack", dest="autoattack", action="store_false", help="skip AutoAttack")
    parser.add_argument("--limit", type=int, help="evaluate this many test images only (smoke tests)")
    parser.add_argument(
        "--aa-limit",
        type=int,
        default=500,
        help="AutoAttack (and the worst case over every attack) on this many test images, evenly "
        "spaced (default 500: AutoAttack's Square costs hours on all 10,000 on a CPU)",
    )
    parser.add_argument("--train-only", action="store_true", help="train (or keep) the runs, evaluate nothing")
    parser.add_argument(
        "--train-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra train.py arguments for every run (smoke tests), last on the line",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "mnist", help="logs, checkpoints, reports")
    parser.add_argument(
        "--authors",
        type=Path,
        default=ROOT / ".cache" / "fast_adversarial",
        help="where the authors' released models are (or are downloaded to)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="where mnist.md/json go")
    parser.add_argument(
        "--no-authors",
        dest="authors_rows",
        action="store_false",
        help="leave out the authors' released models (offline, without them in --authors)",
    )
    parser.add_argument("--name", default="mnist", help="the results' file name in --out (<name>.md, <name>.json)")
    parser.add_argument("--fresh", action="store_true", help="measure every row again")
    args = parser.parse_args(argv)
    if args.pgd_epochs < 0 or any(s < 0 for s in [*args.seeds, *args.heldout_seeds]):
        parser.error("--pgd-epochs, --seeds and --heldout-seeds must be 0 or more")
    if args.aa_limit < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--limit and --aa-limit must be 1 or more")
    if args.val_size < 1:
        parser.error(f"--val-size must be at least 1, got {args.val_size}")
    env = work_env(args)
    rows = []
    for seed in args.seeds:
        rows.append(ours("configs/mnist_fgsm.yaml", f"fgsm_seed{seed}", seed, args.train_args, args, env))
    for seed in args.heldout_seeds:
        rows.extend(heldout(seed, args, env))
    if args.authors_rows:
        rows.append(theirs("fgsm", args, env))
    if args.pgd_epochs:
        name = f"pgd_{args.pgd_epochs}ep"
        extra = ["--trainer.max_epochs", str(args.pgd_epochs), *args.train_args]
        rows.append({**ours("configs/mnist_pgd.yaml", name, 0, extra, args, env), "epochs": args.pgd_epochs})
    if args.authors_rows:
        rows.append(theirs("pgd_madry", args, env))
    if args.train_only:
        return {"rows": rows}
    means = {}
    for key, prefix, suffix in (
        ("fgsm_mean", "fgsm_seed", ""),
        ("heldout_mean", "fgsm_heldout_seed", ""),
        ("heldout_best_mean", "fgsm_heldout_seed", "_best"),
    ):
        if recipe := seed_rows(rows, prefix, suffix):
            means[key] = mean_row(recipe, key) | ({"val_size": args.val_size} if "heldout" in key else {})
    line = machine()
    command = "python experiments/mnist.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(rows, means, line)
    doc = {"machine": line, "command": command.strip(), "rows": rows, **means}
    write_results(args.out, args.name, document(text, command.strip(), rows[0]["n"], rows[0].get("aa_n")), doc)
    print(text)
    return doc


if __name__ == "__main__":
    main()
