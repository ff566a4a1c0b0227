"""What the experiments under ``experiments/`` share: the machine line that heads every table they print, the
smoke tests' batch limit and the eps check made before any training."""

from __future__ import annotations

import argparse
import datetime
import platform

import torch

from robust.errors import RobustError
from robust.threats import ThreatSpec


def machine(device: torch.device | None = None) -> str:
    """Date, CPU model, torch version, the CPU capability torch dispatches to, thread count; and the GPU when
    ``device`` is a CUDA device."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda" else ""
    capability, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    return f"{datetime.date.today()}, {cpu}, torch {torch.__version__}, capability {capability}, {threads} threads{gpu}"


def fmt(value: float | None) -> str:
    """A figure in [0, 1] with three decimals; ``-`` for none."""
    return "-" if value is None else f"{value:.3f}"


def limit_args(limit_train_batches: int | None) -> list[str]:
    """train.py's arguments for ``--limit-train-batches`` (training batches per epoch, for smoke tests); none unset."""
    return [] if limit_train_batches is None else ["--trainer.limit_train_batches", str(limit_train_batches)]


def check_eps(parser: argparse.ArgumentParser, *eps: float) -> None:
    """argparse's error (one line, exit 2) for the first eps the threat suite rejects: before hours of training, not
    after them."""
    try:
        for value in eps:
            ThreatSpec(eps=value)
    except RobustError as exc:
        parser.error(str(exc))
