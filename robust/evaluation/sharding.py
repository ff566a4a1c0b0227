"""A report's batches over processes, with each batch's counts journaled so a killed report resumes.

A pass is the list of batches the single-process loader yields, numbered from 0; batch ``b`` is always attacked
under ``spec.for_batch(b)``, whichever process handles it, so random starts and targets, and with them the figures,
do not depend on the number of processes. The batches still to do go round-robin to the processes, one per process
per round (or a group of consecutive batches, for an attack that runs faster on more images at once: AutoAttack's
FAB-T and Square); after each round rank 0 gathers their integer counts (exact sums, never averaged floats), adds
them up and journals them: one small JSON per batch (a shard; a group) and eps,
``<folder>/eps=<eps>/shard-<b>-of-<n>.json``, written atomically and stamped with a fingerprint of the model, the
data and the settings, so a changed argument never reuses a stale count. Only rank 0 touches files; the output
folder need not be shared between nodes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from robust.errors import RobustError
from robust.files import atomic_write_bytes
from robust.threats import ThreatSpec

# (batch number, indices into the specs still to measure on it)
Work = list[tuple[int, list[int]]]


@dataclass(frozen=True)
class World:
    """The processes of a report: ``fabric`` (a launched :class:`lightning.fabric.Fabric`) when there are several,
    else None for this process alone; ``device`` is this process's."""

    device: torch.device
    fabric: Any = None

    @property
    def rank(self) -> int:
        return 0 if self.fabric is None else self.fabric.global_rank

    @property
    def size(self) -> int:
        return 1 if self.fabric is None else self.fabric.world_size

    def gather(self, counts: Tensor) -> Tensor:
        """Every process's ``counts`` (same shape everywhere), stacked: ``size×...`` on the CPU."""
        if self.fabric is None:
            return counts[None]
        return self.fabric.all_gather(counts.to(self.device)).cpu()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        return obj if self.fabric is None else self.fabric.broadcast(obj, src=0)

    def rank_zero_first(self) -> contextlib.AbstractContextManager:
        """A block that rank 0 runs before the others (downloads, caches)."""
        return contextlib.nullcontext() if self.fabric is None else self.fabric.rank_zero_first()


def launch(device: torch.device, devices: int = 1, num_nodes: int = 1) -> World:
    """This process alone on ``device`` when ``devices × num_nodes`` is 1; otherwise Lightning Fabric's DDP over
    ``devices`` devices of ``device``'s type on each of ``num_nodes`` nodes (CPU processes use gloo). Fabric starts the
    local processes itself (re-running the command), or joins those started by ``torchrun`` or SLURM."""
    started = int(os.environ.get("WORLD_SIZE", "1"))
    if devices * num_nodes == 1:
        if started > 1:
            raise RobustError(
                f"this is one of {started} processes (WORLD_SIZE) but devices × num_nodes is 1: make "
                "them match (--devices, --num-nodes), or each would do the whole report"
            )
        return World(device)
    if device.index is not None:
        raise RobustError(f"several processes take one device each: give the device type {device.type!r}, not {device}")
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=device.type, devices=devices, num_nodes=num_nodes, strategy="ddp")
    fabric.launch()
    return World(fabric.device, fabric)


class Journal:
    """Integer counts of finished batches, one JSON file per batch and eps under ``folder``, valid only for the
    ``identity`` (JSON-native: model, data, batch size, device, ...) and the spec they were measured with. ``resume``
    False: counts are written but never read."""

    def __init__(self, folder: str | Path, identity: dict, resume: bool = False) -> None:
        self.folder, self.resume = Path(folder), resume
        self.identity = json.loads(json.dumps(identity))

    def _file(self, spec: ThreatSpec, batch: int, batches: int) -> Path:
        return self.folder / f"eps={spec.eps!r}" / f"shard-{batch}-of-{batches}.json"

    def _fingerprint(self, spec: ThreatSpec, batch: int, batches: int) -> str:
        key = {"identity": self.identity, "spec": asdict(spec), "batch": batch, "batches": batches}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def load(self, spec: ThreatSpec, batch: int, batches: int) -> list[int] | None:
        """The counts journaled for ``batch`` of ``batches`` under ``spec``; None when not resuming, missing,
        unreadable or measured with anything else."""
        if not self.resume:
            return None
        try:
            entry = json.loads(self._file(spec, batch, batches).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("fingerprint") != self._fingerprint(spec, batch, batches):
            return None
        return entry["counts"]

    def save(self, spec: ThreatSpec, batch: int, batches: int, counts: Sequence[int]) -> None:
        entry = {"fingerprint": self._fingerprint(spec, batch, batches), "counts": [int(c) for c in counts]}
        atomic_write_bytes(self._file(spec, batch, batches), json.dumps(entry).encode())

    def clear(self) -> None:
        """Remove the journal (once the report it was for is written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def numbered_batches(loader: DataLoader | Sequence, wanted: Sequence[int]) -> Iterator:
    """Batches number ``wanted`` (ascending) of ``loader``, as its own iteration would make them: a DataLoader loads
    only those (same indices per batch, same workers), a list of batches is indexed."""
    if isinstance(loader, DataLoader):
        index_lists = list(loader.batch_sampler)
        loader = DataLoader(
            loader.dataset,
            batch_sampler=[index_lists[b] for b in wanted],
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
        )
        return iter(loader)
    return (loader[b] for b in wanted)


def pending(specs: Sequence[ThreatSpec], batches: int, journal: Journal | None, total: Tensor) -> Work:
    """The (batch, spec indices) not in ``journal``, in batch order; adds the journaled counts into ``total``
    (``len(specs)×width``)."""
    work: Work = []
    for b in range(batches):
        todo = []
        for e, spec in enumerate(specs):
            done = None if journal is None else journal.load(spec, b, batches)
            if done is None:
                todo.append(e)
            else:
                total[e] += torch.tensor(done)
        if todo:
            work.append((b, todo))
    return work


def sharded_counts(
    loader: DataLoader | Sequence,
    specs: Sequence[ThreatSpec],
    count: Callable[[int, list[tuple[int, Tensor, Tensor]], list[ThreatSpec]], Tensor],
    width: int,
    world: World,
    journal: Journal | None = None,
    progress: bool = True,
    group: int = 1,
) -> Tensor:
    """Integer counts summed over every batch of ``loader`` (a DataLoader or a list of ``(x, y)`` batches), for
    each of ``specs``: ``len(specs)×width`` int64, the same on every process.

    The unit of work (and of the journal) is a group of ``group`` consecutive batches: ``count(g, batches,
    specs_to_do)`` gives group ``g``'s ``len(specs_to_do)×width`` counts from its ``[(b, x, y), ...]``. Groups
    already in the ``journal`` are not recomputed; finished ones are journaled by rank 0 after each round."""
    if group < 1:
        raise RobustError(f"group must be at least 1 batch, got {group}")
    batches = len(loader)
    groups = -(-batches // group)
    members = [list(range(g * group, min((g + 1) * group, batches))) for g in range(groups)]
    total = torch.zeros(len(specs), width, dtype=torch.int64)
    work = world.broadcast(pending(specs, groups, journal, total) if world.rank == 0 else None)
    mine = work[world.rank :: world.size]
    data = numbered_batches(loader, [b for g, _ in mine for b in members[g]])
    size = sum(len(members[g]) for g, _ in work)
    with tqdm(total=size, desc="robustness", unit="batch", disable=not progress or world.rank != 0) as bar:
        for start in range(0, len(work), world.size):
            counts = torch.full((len(specs), width), -1, dtype=torch.int64)
            if start + world.rank < len(work):
                g, todo = work[start + world.rank]
                batch = [(b, *next(data)) for b in members[g]]
                counts[todo] = count(g, batch, [specs[e] for e in todo])
            gathered = world.gather(counts)
            if world.rank == 0:
                for rank, (g, todo) in enumerate(work[start : start + world.size]):
                    for e in todo:
                        total[e] += gathered[rank, e]
                        if journal is not None:
                            journal.save(specs[e], g, groups, gathered[rank, e].tolist())
            bar.update(sum(len(members[g]) for g, _ in work[start : start + world.size]))
    return world.broadcast(total)
