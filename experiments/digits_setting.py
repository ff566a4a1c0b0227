"""Which digits setting makes `make train` both fast and meaningful: per setting, the robust run and its clean twin.

    python experiments/digits_setting.py [--sizes 12 16] [--epochs 10] [--stem cifar] [--eps 0.14]
        [--twin-eps 0.14 0.16] [--threads 1]

Each setting is `make train`'s recipe (configs/digits.yaml, guard and all) at one digits size and epoch count (with
ResNet18's CIFAR stem, the config's, or with ``--stem imagenet`` torchvision's own 7×7/2 conv and max-pool),
trained twice from the same seed: adversarially (the config's FGSM-RS at ``--eps``) and clean (``--model.adv_ratio
0``, its twin). An eps means something only where the twin falls to it: the upsampled 8×8 digits are smooth enough
that clean-trained models keep much of their accuracy under small perturbations, and how much depends on the size
and on how long they train. Validation is off; both models are then measured on the 360 held-out digits by
:func:`robust.threats.accuracy` (PGD-10 with step eps/4 and a random start, APGD-CE-10, seeded): the robust run's
clean, PGD-10 and ``pgd_worst`` accuracy at ``--eps``, and the twin's clean and PGD-10 accuracy at each
``--twin-eps`` (its training does not depend on eps, so one twin serves them all).

Output: ``ROW {json}`` per setting as soon as it is measured, then a Markdown table headed by the machine line.
Figures move by a few points with the thread count and the CPU (float summation order): it is an experiment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from experiments.common import check_eps, fmt, limit_args, machine  # noqa: E402
from robust.threats import ThreatSpec, accuracy  # noqa: E402

CONFIG = ROOT / "configs" / "digits.yaml"
ROBUST_THREATS = ("clean", "pgd", "pgd_worst")


def fit(size: int, epochs: int, eps: float, adv: bool, args: argparse.Namespace):
    """Train the config's recipe at ``size``×``size`` for ``epochs`` (clean when not ``adv``); the fitted CLI
    (its ``model`` and ``datamodule``) and the training wall time in seconds."""
    kind = "adv" if adv else "clean"
    cli = train.main(
        [
            "--config",
            str(CONFIG),
            "--seed_everything",
            str(args.seed),
            "--model.eps",
            str(eps),
            "--model.adv_ratio",
            "1.0" if adv else "0",
            "--model.cifar_stem",
            str(args.stem == "cifar").lower(),
            "--data.init_args.image_size",
            str(size),
            "--trainer.max_epochs",
            str(epochs),
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(Path(args.out) / f"{args.stem}-{size}px-{epochs}ep-{kind}"),
            *limit_args(args.limit_train_batches),
        ],
        run=False,
    )
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, time.perf_counter() - start


def measure(size: int, epochs: int, args: argparse.Namespace) -> dict:
    robust_cli, robust_s = fit(size, epochs, args.eps, True, args)
    twin_cli, twin_s = fit(size, epochs, args.eps, False, args)
    x, y = robust_cli.datamodule.val_set.tensors  # the 360 held-out digits of the config's split
    robust, twin = robust_cli.model.model, twin_cli.model.model
    row = {
        "stem": args.stem,
        "size": size,
        "epochs": epochs,
        "eps": args.eps,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
    }
    scores = accuracy(robust, x, y, ThreatSpec(eps=args.eps, threats=ROBUST_THREATS))
    row.update({f"robust_{k}": v for k, v in scores.items()})
    row["twin_clean"] = accuracy(twin, x, y, ThreatSpec(eps=args.eps, threats=("clean",)))["clean"]
    row["twin_pgd"] = {str(e): accuracy(twin, x, y, ThreatSpec(eps=e, threats=("pgd",)))["pgd"] for e in args.twin_eps}
    return {**row, "robust_train_s": round(robust_s, 1), "twin_train_s": round(twin_s, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12, 16], help="digits sizes in pixels")
    parser.add_argument("--epochs", type=int, nargs="+", default=[10], help="epoch counts")
    parser.add_argument(
        "--stem",
        choices=("cifar", "imagenet"),
        default="cifar",
        help="ResNet18's first layers: the CIFAR stem (3×3 conv, no max-pool) or torchvision's own",
    )
    parser.add_argument("--eps", type=float, default=0.14, help="training and evaluation eps of the robust run")
    parser.add_argument("--twin-eps", type=float, nargs="+", default=[0.14, 0.16], help="eps the twin is attacked at")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-train-batches", type=int, help="training batches per epoch (smoke tests)")
    parser.add_argument("--out", default="runs/digits_setting", help="TensorBoard logs (default runs/digits_setting)")
    args = parser.parse_args(argv)
    if min(args.sizes) < 1 or min(args.epochs) < 1 or args.threads < 1:
        parser.error("--sizes, --epochs and --threads must be at least 1")
    check_eps(parser, args.eps, *args.twin_eps)
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        for epochs in args.epochs:
            rows.append(measure(size, epochs, args))
            print("ROW " + json.dumps(rows[-1]), flush=True)
    twin_cols = " | ".join(f"twin PGD-10 @ {e}" for e in args.twin_eps)
    print(f"\n{machine()}; FGSM-RS at eps {args.eps}, 360 held-out digits")
    head = "| stem | size | epochs | robust clean | robust PGD-10 | robust pgd_worst | twin clean"
    print(f"{head} | {twin_cols} | train s (twin) |")
    print("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(args.twin_eps) + "---:|")
    for r in rows:
        twin = " | ".join(fmt(v) for v in r["twin_pgd"].values())
        print(
            f"| {r['stem']} | {r['size']} | {r['epochs']} | {fmt(r['robust_clean'])} | {fmt(r['robust_pgd'])} | "
            f"{fmt(r['robust_pgd_worst'])} | {fmt(r['twin_clean'])} | {twin} | "
            f"{r['robust_train_s']:.0f} ({r['twin_train_s']:.0f}) |"
        )
    return rows


if __name__ == "__main__":
    main()
