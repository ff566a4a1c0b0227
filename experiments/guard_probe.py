"""What a collapse looks like to every candidate probe: train one MNIST run and, at every check the guard makes, measure
the candidate signatures of catastrophic overfitting on the guard's probe and the truth on held-out test images.

    python experiments/guard_probe.py --seed 2 [--attack fgsm_rs] [--alpha 0.375] [--threads 1] [--out runs/probe]

The run is ``configs/mnist_fgsm.yaml`` (Wong et al. 2020's MNIST FGSM-RS) with the guard in ``warn`` mode, forced on.
At the guard's checks (before the first step, then each epoch's last batch) a callback that runs just before the
guard measures, with the model in eval mode and a forked, seeded RNG (training's randomness untouched):

- on the guard's probe (``--probe`` evenly spaced training images): FGSM accuracy, PGD-10 (the guard's default:
  step eps/4, random start), PGD-10 from the clean image with step eps/4 (no random start), PGD-50 step 0.01, and
  the mean cosine between input gradients at two random points of the eps ball (GradAlign's measure, Andriushchenko
  & Flammarion 2020);
- on ``--test`` evenly spaced test images: PGD-50 step 0.01 with 3 restarts (the truth the probe is judged by).

Writes ``--out``/``<attack>_seed<seed>.json``: the machine, the command and one record per check. ``--collect``
turns such files into the trajectories ``tests/test_overfit_guard.py`` replays through the guard's rule.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from experiments.common import machine  # noqa: E402
from robust.attacks import fgsm, pgd, seeded_rng  # noqa: E402
from robust.training.guard import CatastrophicOverfittingGuard  # noqa: E402


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def grad_cosine(model, x, y, eps: float) -> float:
    """Mean cosine between the input gradients of the loss at two uniform random points of the eps ball."""
    grads = []
    for _ in range(2):
        point = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1).requires_grad_(True)
        loss = F.cross_entropy(model(point), y)
        grads.append(torch.autograd.grad(loss, point)[0].flatten(1))
    return F.cosine_similarity(grads[0], grads[1], dim=1).mean().item()


class ProbeRecorder(L.Callback):
    """Measures the candidates at every check of the guard (place it before the guard in the callback list)."""

    def __init__(self, guard: CatastrophicOverfittingGuard, test: tuple[torch.Tensor, torch.Tensor], eps: float):
        self.guard, self.test, self.eps = guard, test, eps
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self.records: list[dict] = []
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        # the guard's own probe: the same images it takes, drawn under the same seed
        self.probe = self.guard.take_probe(trainer, self.guard.n, self.guard.seed)
        self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_last_batch and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.measure(trainer, pl_module)

    def measure(self, trainer, pl_module) -> None:
        model, eps = pl_module.model, self.eps
        was_training = model.training
        model.eval()
        x, y = self.probe
        xt, yt = self.test
        start = time.perf_counter()
        with torch.enable_grad(), seeded_rng(0):
            record = {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "fgsm": accuracy(model, fgsm(model, x, y, eps), y),
                "pgd10": accuracy(model, pgd(model, x, y, eps, eps / 4, 10), y),
                "pgd10_nors": accuracy(model, pgd(model, x, y, eps, eps / 4, 10, random_start=False), y),
                "pgd50": accuracy(model, pgd(model, x, y, eps, 0.01, 50), y),
                "cos": grad_cosine(model, x, y, eps),
                "clean": accuracy(model, x, y),
                "test_clean": accuracy(model, xt, yt),
                "test_pgd50x3": accuracy(model, pgd(model, xt, yt, eps, 0.01, 50, restarts=3), yt),
            }
        record["seconds"] = round(time.perf_counter() - start, 1)
        model.train(was_training)
        self.records.append(record)
        print("CHECK " + json.dumps(record), flush=True)


def truth_collapse(checks: list[dict], floor: float = 0.1, grace: float = 0.4) -> int | None:
    """The first check at which the truth (held-out PGD-50×3) shows catastrophic overfitting: a fall of more than 0.2
    below its best and below half of it, or, from ``grace`` of the run on, never having reached ``floor``."""
    best = 0.0
    for i, c in enumerate(checks):
        truth = c["test_pgd50x3"]
        if best >= floor and truth < best - 0.2 and truth < best / 2:
            return i
        if c["progress"] >= grace and max(best, truth) < floor:
            return i
        best = max(best, truth)
    return None


def logged_run(log_dir: Path) -> dict:
    """A TensorBoard run of ``train.py`` with the guard in ``warn`` mode (``make train``'s, say) as :func:`collect`
    keeps it: its guard checks, and as the truth its final ``val/pgd_worst``; a healthy run (``collapse_at`` None)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(log_dir))
    logs.Reload()
    pgd, fgsm = logs.Scalars("guard/pgd"), logs.Scalars("guard/fgsm")
    total = pgd[-1].step
    final = logs.Scalars("val/pgd_worst")[-1].value if "val/pgd_worst" in logs.Tags()["scalars"] else None
    return {
        "name": str(log_dir),
        "checks": [[p.value, f.value, round(p.step / total, 4)] for p, f in zip(pgd, fgsm, strict=True)],
        "final_val_pgd_worst": final,
        "collapse_at": None,
    }


def collect(paths: list[Path]) -> dict:
    """The trajectories of ``paths`` (this script's JSON outputs, or :func:`logged_run`'s log folders) as the guard's
    tests replay them: per run, each check's (guard PGD, guard FGSM, progress) and the check at which the truth
    collapsed (None: it never did)."""
    runs = []
    for path in paths:
        if path.is_dir():
            runs.append(logged_run(path))
            continue
        result = json.loads(path.read_text())
        total = result["guard_history"][-1]["step"]  # a run in warn mode ends where it was planned to
        checks = [
            {**c, "progress": h["step"] / total, "guard_pgd": h["guard/pgd"], "guard_fgsm": h["guard/fgsm"]}
            for c, h in zip(result["checks"], result["guard_history"], strict=True)
        ]
        runs.append(
            {
                "name": f"{path.parent.name}/{path.stem}",
                "machine": result["machine"],
                "command": result["command"],
                "checks": [[c["guard_pgd"], c["guard_fgsm"], round(c["progress"], 4)] for c in checks],
                "truth_pgd50x3": [c["test_pgd50x3"] for c in checks],
                "collapse_at": truth_collapse(checks),
            }
        )
    return {"written_by": "python experiments/guard_probe.py --collect <run JSONs> --to <this file>", "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collect", nargs="+", type=Path, help="write these runs' trajectories to --to, train none")
    parser.add_argument("--to", type=Path, default=ROOT / "tests" / "data" / "guard_trajectories.json")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--attack", default="fgsm_rs", choices=["fgsm", "fgsm_rs", "nfgsm"])
    parser.add_argument("--alpha", type=float, default=None, help="training step (default: the config's)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit-train-batches", type=int)
    parser.add_argument("--out", default="runs/probe")
    args = parser.parse_args(argv)
    if args.collect:
        record = collect(args.collect)
        args.to.parent.mkdir(parents=True, exist_ok=True)
        args.to.write_text(json.dumps(record, indent=1) + "\n")
        return record
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    extra = ["--model.alpha", str(args.alpha)] if args.alpha is not None else []
    if args.limit_train_batches:
        extra += ["--trainer.limit_train_batches", str(args.limit_train_batches)]
    cli = train.main(
        [
            "--config",
            str(ROOT / "configs" / "mnist_fgsm.yaml"),
            "--seed_everything",
            str(args.seed),
            "--model.attack",
            args.attack,
            *extra,
            "--trainer.max_epochs",
            str(args.epochs),
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--overfit_guard.action",
            "warn",
            "--overfit_guard.force",
            "true",
            "--overfit_guard.n",
            str(args.probe),
            "--trainer.logger.init_args.save_dir",
            str(out / "logs" / f"{args.attack}_seed{args.seed}"),
        ],
        run=False,
    )
    guard = next(cb for cb in cli.trainer.callbacks if isinstance(cb, CatastrophicOverfittingGuard))
    cli.datamodule.setup("test")
    ds = cli.datamodule.test_dataloader().dataset
    idx = torch.linspace(0, len(ds) - 1, args.test).round().long().tolist()
    xt = torch.stack([ds[i][0] for i in idx])
    yt = torch.as_tensor([int(ds[i][1]) for i in idx])
    recorder = ProbeRecorder(guard, (xt, yt), float(cli.model.hparams.eps))
    cli.trainer.callbacks.insert(0, recorder)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    result = {
        "machine": machine(),
        "command": "python experiments/guard_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "attack": args.attack,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "guard_history": guard.history,
        "checks": recorder.records,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.attack}_seed{args.seed}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
