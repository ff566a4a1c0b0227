"""Attacks at the speed floor (issue #41): ``python benchmarks/run.py --only floor``.

For each model (ResNet18 with the CIFAR stem, PreAct-ResNet18, ``mnist_net``; random weights, eval mode) and each
thread count, in interleaved rounds: our PGD on the fast path (:func:`robust.fast_path.fast_model`), our PGD on the
model itself, ``torchattacks.PGD`` on the model itself (as a user runs it), and one no-gradient forward of each. Our
step over the floor is the fast path's time per PGD step over 2 × the fastest forward of the same model and batch:
an input-gradient step is one forward and one backward, and a backward costs at least a forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchattacks
from torch import Tensor, nn

from benchmarks.timing import Row, Sizes, time_interleaved
from robust.attacks import default_step, pgd
from robust.fast_path import fast_model
from robust.models.build import CIFAR10_MEAN, CIFAR10_STD, build_model

EPS = 8 / 255
ALPHA = default_step("pgd", EPS)
THREADS = (1, 2)


@dataclass(frozen=True)
class FloorModel:
    """One model of the benchmark: how to build it, its batch (``FULL``; ``QUICK`` takes 2) and its input."""

    name: str
    build: Callable[[], nn.Module]
    batch: int
    image: int
    channels: int
    goal: float  # our PGD (fast path) over torchattacks'


def _cifar(arch: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: build_model(arch, 10, mean=CIFAR10_MEAN, std=CIFAR10_STD, **kwargs)


MODELS = (
    FloorModel("resnet18", _cifar("resnet18", cifar_stem=True), 64, 32, 3, 1.3),
    FloorModel("preact_resnet18", _cifar("preact_resnet18"), 64, 32, 3, 1.05),
    FloorModel("mnist_net", lambda: build_model("mnist_net", 10, mean=(0.1307,), std=(0.3081,)), 512, 28, 1, 1.05),
)
STEP_GOAL = 1.1  # our step over the floor


def bench_floor(
    device: torch.device,
    sizes: Sizes,
    run: dict,
    images: Callable[[int, int], Tensor],
    threads: tuple[int, ...] = THREADS,
) -> tuple[list[Row], dict[str, float]]:
    """Rows and JSON keys of every model at each of ``threads`` (torch's thread count is restored after).
    ``images(n, size)``: ``n×3×size×size`` photos in [0, 1]."""
    rows: list[Row] = []
    keys: dict[str, float] = {}
    before = torch.get_num_threads()
    try:
        for spec in MODELS:
            torch.manual_seed(0)
            batch = 2 if sizes.quick else spec.batch
            x = images(batch, spec.image).to(device)
            x = x.mean(1, keepdim=True) if spec.channels == 1 else x
            y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(0)).to(device)
            model = spec.build().to(device).eval()
            for count in threads:
                torch.set_num_threads(count)
                new_rows, new_keys = _one(spec, model, x, y, sizes.pgd_steps, count, run)
                rows += new_rows
                keys.update(new_keys)
    finally:
        torch.set_num_threads(before)
    return rows, keys


def _one(spec: FloorModel, model: nn.Module, x: Tensor, y: Tensor, steps: int, threads: int, run: dict) -> tuple:
    fast = fast_model(model)  # built once, as the report builds it once per evaluation
    theirs = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=steps, random_start=True)

    def forward(m: nn.Module) -> Callable[[], object]:
        def call() -> None:
            with torch.no_grad():
                m(x)

        return call

    t = time_interleaved(
        {
            "fast": lambda: pgd(fast, x, y, EPS, ALPHA, steps),
            "plain": lambda: pgd(model, x, y, EPS, ALPHA, steps),
            "torchattacks": lambda: theirs(x, y),
            "forward_fast": forward(fast),
            "forward_plain": forward(model),
        },
        **run,
    )
    floor = 2 * min(t["forward_fast"], t["forward_plain"])
    over_theirs, over_floor = t["torchattacks"] / t["fast"], t["fast"] / steps / floor
    variant = f"{threads} thread{'s' if threads > 1 else ''}"
    name = f"{spec.name} PGD-{steps}"
    rows = [
        Row(f"{name}, ours (fast path)", variant, t["fast"], len(x), over_theirs, f">= {spec.goal} vs torchattacks"),
        Row(f"{name}, ours (model itself)", variant, t["plain"], len(x), t["torchattacks"] / t["plain"]),
        Row(f"{name}, torchattacks", variant, t["torchattacks"], len(x)),
        Row(f"{spec.name} step / 2 forwards", variant, t["fast"] / steps, len(x), over_floor, f"<= {STEP_GOAL}"),
    ]
    s = f"{spec.name}_t{threads}"
    keys = {
        f"{s}_pgd_fast_over_torchattacks": over_theirs,
        f"{s}_pgd_fast_over_plain": t["plain"] / t["fast"],
        f"{s}_pgd_plain_over_torchattacks": t["torchattacks"] / t["plain"],
        f"{s}_step_over_floor": over_floor,
        f"{s}_forward_fast_over_plain": t["forward_plain"] / t["forward_fast"],
    }
    return rows, keys
