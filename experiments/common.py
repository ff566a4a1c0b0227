"""What the experiments under ``experiments/`` share: the machine line that heads every table they print, the
smoke tests' batch limit and the eps check made before any training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from robust.errors import RobustError
from robust.files import atomic_write_files
from robust.machine import machine
from robust.threats import ThreatSpec

__all__ = ["check_eps", "fmt", "limit_args", "machine", "write_results"]


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


READING = "## Reading"


def write_results(out: Path, name: str, markdown: str, record: dict) -> None:
    """Write ``out``/``name``.md and .json at once. The markdown is the experiment's own; a ``## Reading`` section
    already in the file (the interpretation, written by hand) is kept after it, so a rerun updates the figures and
    leaves the reading for its author to check against them."""
    path = Path(out) / f"{name}.md"
    old = path.read_text() if path.is_file() else ""
    reading = old[old.index(READING) :] if READING in old else ""
    text = markdown.rstrip("\n") + "\n" + (f"\n{reading.rstrip()}\n" if reading else "")
    atomic_write_files(
        out, {f"{name}.json": (json.dumps(record, indent=2) + "\n").encode(), f"{name}.md": text.encode()}
    )
