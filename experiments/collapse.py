"""Catastrophic overfitting, provoked for real, and what the guard keeps: one row per seed.

    python experiments/collapse.py [--seeds 0 1 2] [--threads 2] [--epochs 20] [--eps 0.2] [--attack fgsm]

Each run is `make train`'s digits recipe (16×16, ResNet18 with the CIFAR stem, one-cycle SGD to 0.1) with plain
FGSM (no random start) at eps 0.2, the overfitting guard in ``stop`` mode with ``min_drop`` 0.25 (so the collapse
completes before the check that catches it). Plain FGSM at that eps is known to collapse (Wong et al. 2020): PGD
accuracy falls towards 0 while FGSM accuracy climbs. Whether and when it does depends on the seed, the thread
count and the CPU's instruction set (float summation order), which is why this is an experiment and not a test.
``--attack nfgsm`` (or ``fgsm_rs``) trains the same runs with that single-step attack instead, to see whether it
holds where plain FGSM collapses (de Jorge et al. 2022).

Per run: the epoch the guard flagged (``-`` if none), the guard's probe figures (64 training images; its PGD
accuracy at every epoch as ``probe_pgd_by_epoch``), and on the
360 held-out digits at eps 0.2 (PGD-10 with step eps/4 and random start, FGSM; seeded) the collapsed model's and
the kept ``last.ckpt``'s accuracies. Prints a Markdown table headed by the machine, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from experiments.common import check_eps, fmt, limit_args, machine  # noqa: E402
from robust import load_model  # noqa: E402
from robust.attacks import default_step, fgsm, pgd, seeded_rng  # noqa: E402

IMAGE_SIZE = 16  # the digits size these runs train and are measured at


class CollapseRecorder(L.Callback):
    """Keeps the weights the guard is about to judge at each epoch's last batch (it must run before the guard)
    and, from the guard's logged ``guard/*`` figures, the first weights it judged collapsed and the best probe."""

    def __init__(self) -> None:
        self.pending: torch.nn.Module | None = None
        self.collapsed: torch.nn.Module | None = None
        self.flagged: dict[str, float] = {}
        self.best_probe_pgd = 0.0
        self.probe_pgd: list[float] = []  # the guard's PGD accuracy at the end of each epoch trained

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_last_batch:
            self.pending = copy.deepcopy(pl_module.model).eval()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("guard/")}
        if not metrics:
            return
        self.probe_pgd.append(round(metrics["guard/pgd"], 3))
        if self.collapsed is None and metrics.get("guard/collapsed") == 1.0:
            self.collapsed = self.pending
            self.flagged = {"epoch": trainer.current_epoch, **metrics, "best": self.best_probe_pgd}
        elif self.collapsed is None:
            self.best_probe_pgd = max(self.best_probe_pgd, metrics["guard/pgd"])


def held_out(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[float, float]:
    """(PGD-10, FGSM) accuracy on the held-out digits ``x``, ``y``; PGD step eps/4, random start, seeded."""
    model.eval()
    with seeded_rng(0):
        x_pgd, x_fgsm = pgd(model, x, y, eps, default_step("pgd", eps), 10), fgsm(model, x, y, eps)
    with torch.no_grad():
        return tuple((model(a).argmax(1) == y).float().mean().item() for a in (x_pgd, x_fgsm))


def run(seed: int, args: argparse.Namespace) -> dict:
    save_dir = Path(args.out) / args.attack / f"seed{seed}"
    cli = train.main(
        [
            "--config",
            str(ROOT / "configs" / "digits.yaml"),
            "--seed_everything",
            str(seed),
            "--model.attack",
            args.attack,
            "--model.eps",
            str(args.eps),
            "--data.init_args.image_size",
            str(IMAGE_SIZE),
            "--trainer.max_epochs",
            str(args.epochs),
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--overfit_guard.action",
            "stop",
            "--overfit_guard.min_drop",
            str(args.min_drop),
            "--overfit_guard.force",
            "true",  # watch whatever --attack is (by default the guard watches single-step attacks only)
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
            *limit_args(args.limit_train_batches),
        ],
        run=False,
    )
    recorder = CollapseRecorder()
    cli.trainer.callbacks.insert(0, recorder)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    last = next(cb for cb in cli.trainer.checkpoint_callbacks if cb.monitor is None).best_model_path
    x, y = cli.datamodule.val_set.tensors  # the 360 held-out digits of the config's split
    kept = held_out(load_model(last), x, y, args.eps)
    collapsed = held_out(recorder.collapsed, x, y, args.eps) if recorder.collapsed is not None else (None, None)
    flagged = recorder.flagged
    return {
        "attack": args.attack,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "flagged_epoch": flagged.get("epoch"),
        "probe_best_pgd": flagged.get("best", recorder.best_probe_pgd),
        "probe_pgd": flagged.get("guard/pgd"),
        "probe_fgsm": flagged.get("guard/fgsm"),
        "collapsed_pgd": collapsed[0],
        "collapsed_fgsm": collapsed[1],
        "kept_pgd": kept[0],
        "kept_fgsm": kept[1],
        "epochs_run": len(recorder.probe_pgd),
        "seconds": round(seconds, 1),
        "probe_pgd_by_epoch": recorder.probe_pgd,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument(
        "--attack",
        choices=["fgsm", "fgsm_rs", "nfgsm"],
        default="fgsm",
        help="the single-step training attack (default fgsm: the one that collapses)",
    )
    parser.add_argument("--min-drop", type=float, default=0.25)
    parser.add_argument("--out", default="runs/collapse")
    parser.add_argument("--limit-train-batches", type=int, help="training batches per epoch (smoke tests)")
    args = parser.parse_args(argv)
    if min(args.seeds) < 0 or args.epochs < 1 or args.threads < 1 or not 0 < args.min_drop <= 1:
        parser.error("--seeds must be 0 or more, --epochs and --threads at least 1, --min-drop in (0, 1]")
    check_eps(parser, args.eps)
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:  # each row as soon as it is measured: a long run can be read (or stopped) midway
        rows.append(run(seed, args))
        print("ROW " + json.dumps(rows[-1]), flush=True)
    setting = f"{args.attack} eps {args.eps}, guard stop, min_drop {args.min_drop}, up to {args.epochs} epochs"
    print(f"\n{machine()}; {setting}")
    print(
        "| seed | flagged at epoch | probe PGD best → at flag | probe FGSM at flag | held-out PGD / FGSM collapsed "
        "| held-out PGD / FGSM kept | epochs | s |"
    )
    print("|---:|---:|---|---:|---|---|---:|---:|")
    for r in rows:
        flag = "-" if r["flagged_epoch"] is None else str(r["flagged_epoch"])
        probe = f"{fmt(r['probe_best_pgd'])} → {fmt(r['probe_pgd'])} | {fmt(r['probe_fgsm'])}"
        collapsed = f"{fmt(r['collapsed_pgd'])} / {fmt(r['collapsed_fgsm'])}"
        kept = f"{fmt(r['kept_pgd'])} / {fmt(r['kept_fgsm'])}"
        print(f"| {r['seed']} | {flag} | {probe} | {collapsed} | {kept} | {r['epochs_run']} | {r['seconds']:.0f} |")
    print(json.dumps({"machine": machine(), "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
