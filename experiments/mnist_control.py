"""Control for the MNIST FGSM-RS row: is its seed-to-seed spread the recipe's, or our pipeline's?

    python experiments/mnist_control.py [--seeds 0 1 2] [--threads 1] [--limit 2000] [--epochs 10]

Trains Wong et al. 2020's MNIST FGSM-RS recipe (``MNIST/train_mnist.py``'s defaults, the settings of
``configs/mnist_fgsm.yaml``) in a plain PyTorch loop, with none of the product's training code: torchvision's MNIST
with ``ToTensor`` only, a shuffled loader of 100, ``mnist_net``, Adam with the learning rate interpolated per batch
0 -> 5e-3 at 2/5 of the run -> 0, and the attack written out here (uniform start in the eps box, unclipped; one
signed step of 0.375; clipped to the box and to [0, 1]). The final weights of each seed are then measured by the same
``evaluate.py report`` with the paper's protocol as the rows of ``experiments/mnist.py`` (PGD-50 × 10 restarts and
APGD-CE-100 at eps 0.3). If the plain loop spreads as widely across seeds as ``train.py`` does, the spread is the
recipe's; if it lands consistently near the authors' ``fgsm.pth``, our pipeline differs from the paper's.
Writes ``docs/results/mnist_control.md`` (+ ``.json``); rows are kept in ``--work`` as ``experiments/mnist.py`` does.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from experiments.common import machine, write_results  # noqa: E402
from experiments.mnist import evaluate, kept, pct, work_env  # noqa: E402
from robust.files import atomic_write_bytes  # noqa: E402
from robust.models.archs import build_arch  # noqa: E402
from robust.training.runfiles import data_root  # noqa: E402

EPS, ALPHA, LR_MAX, EPOCHS, BATCH = 0.3, 0.375, 5e-3, 10, 100  # train_mnist.py's defaults


def fgsm_rs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training attack, written out: ``N×1×28×28`` in [0, 1] -> adversarial images in [0, 1], within EPS."""
    delta = torch.empty_like(x).uniform_(-EPS, EPS).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
    delta = (delta.detach() + ALPHA * grad.sign()).clamp(-EPS, EPS)
    return (x + delta).clamp(0, 1)


def train_plain(seed: int, root: str, epochs: int = EPOCHS, batches: int | None = None) -> tuple[dict, float]:
    """The recipe in a plain loop under ``seed`` for ``epochs`` (the schedule fits them; ``batches`` per epoch: all,
    or that many for smoke tests): the final state dict and the wall time in seconds."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    data = torchvision.datasets.MNIST(root, train=True, download=False, transform=torchvision.transforms.ToTensor())
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    model = build_arch("mnist_net", 10, channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=LR_MAX)
    start = time.perf_counter()
    per_epoch = len(loader) if batches is None else min(batches, len(loader))
    for epoch in range(epochs):
        for i, (x, y) in zip(range(per_epoch), loader, strict=False):
            t = epoch + (i + 1) / per_epoch
            opt.param_groups[0]["lr"] = float(np.interp(t, [0, epochs * 2 // 5, epochs], [0, LR_MAX, 0]))
            loss = F.cross_entropy(model(fgsm_rs(model, x, y)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"seed {seed} epoch {epoch} loss {loss.item():.4f} {time.perf_counter() - start:.0f} s", flush=True)
    return model.state_dict(), time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (the paper's: {EPOCHS})")
    parser.add_argument("--limit-train-batches", type=int, help="training batches per epoch (smoke tests; default all)")
    parser.add_argument("--limit", type=int, help="evaluate this many evenly spaced test images (default all)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "mnist_control", help="weights, reports")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="where mnist_control.md goes")
    parser.add_argument("--fresh", action="store_true", help="measure every row again")
    args = parser.parse_args(argv)
    if args.epochs < 1 or (args.limit_train_batches is not None and args.limit_train_batches < 1):
        parser.error("--epochs and --limit-train-batches must be 1 or more")
    args.autoattack = False
    env = work_env(args)
    rows = []
    for seed in args.seeds:
        name = f"plain_seed{seed}"
        weights = args.work / f"{name}.pth"

        def fit(seed: int = seed, weights: Path = weights) -> dict:
            state, seconds = train_plain(seed, data_root(), args.epochs, args.limit_train_batches)
            buffer = io.BytesIO()
            torch.save(state, buffer)
            atomic_write_bytes(weights, buffer.getvalue())
            return {"seed": seed, "weights": str(weights), "train_s": round(seconds, 1)}

        trained = kept(f"{name}.train", args, fit)
        rows.append({"name": name, **trained, **evaluate(weights, name, ["--arch", "mnist_net"], args, env)})
    pgd = [r["figures"]["pgd"] for r in rows]
    lines = ["| Seed | Clean | PGD-50×10 | APGD-CE-100 | Training |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        f = r["figures"]
        lines.append(
            f"| {r['seed']} | {pct(f['clean'])} | {pct(f['pgd'])} | {pct(f['apgd'])} | {r['train_s'] / 60:.1f} min |"
        )
    spread = f"{pct(statistics.mean(pgd))} ({pct(min(pgd))}–{pct(max(pgd))})"
    lines.append(f"| mean (range) | | {spread} | | |")
    command = "python experiments/mnist_control.py " + " ".join(argv if argv is not None else sys.argv[1:])
    line = machine()
    text = "\n".join(lines) + f"\n\nAccuracy (%) on {rows[0]['n']:,} MNIST test images at eps 0.3 (L∞); {line}.\n"
    doc = {"machine": line, "command": command.strip(), "rows": rows}
    body = (
        f"# MNIST FGSM-RS: the paper's recipe in a plain PyTorch loop\n\n{__doc__.split(chr(10) * 2, 2)[2]}\n"
        f"    {command.strip()}\n\n{text}"
    )
    write_results(args.out, "mnist_control", body, doc)
    print(text)
    return doc


if __name__ == "__main__":
    main()
