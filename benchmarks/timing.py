"""What the benchmarks share: the run's sizes (:class:`Sizes`, ``FULL`` and ``QUICK``), a table row (:class:`Row`)
and the interleaved timer (:func:`time_interleaved`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """Batch and image sizes of one run: training/attack ``batch`` of ``image``×``image``; JPEG (count, side)."""

    batch: int
    image: int
    pgd_steps: int
    jpeg_small: tuple[int, int]
    jpeg_large: tuple[int, int]
    suite_n: int = 100  # images each threat-suite row evaluates
    suite_steps: int = 10  # the report's default PGD/APGD steps
    aa_n: int = 100  # digits the cheap-worst-case-vs-AutoAttack rows evaluate (ResNet18: AutoAttack takes minutes)
    aa_mnist_n: int = 1000  # MNIST test images of those rows (mnist_net: cheap enough for 10× less sampling noise)
    report_n: int = 500  # MNIST test images of the report-with-AutoAttack rows (issue #41's protocol)
    quick: bool = False


FULL = Sizes(batch=128, image=32, pgd_steps=10, jpeg_small=(256, 32), jpeg_large=(32, 224))
QUICK = Sizes(
    batch=2,
    image=8,
    pgd_steps=2,
    jpeg_small=(8, 32),
    jpeg_large=(2, 64),
    suite_n=8,
    suite_steps=2,
    aa_n=4,
    aa_mnist_n=4,
    report_n=4,
    quick=True,
)


@dataclass
class Row:
    """One line of the table: ``seconds`` per batch of ``images``; ``ratio`` against the row's reference."""

    name: str
    variant: str
    seconds: float
    images: int
    ratio: float | None = None
    goal: str = ""


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, sync: Callable[[], None]
) -> dict[str, float]:
    """Median seconds per call of each function. Each round calls every function once, in an order rotated
    from round to round, so background load and clock changes hit them all alike; warm-up rounds are not timed.
    (``torch.utils.benchmark.Timer`` times one statement's runs back to back: on a shared machine a load that comes
    and goes would then land on one side of a ratio only.)"""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}
