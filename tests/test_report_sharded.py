"""Sharded, resumable reports: batches split over processes sum to the single-process counts exactly; a killed report
resumes without recomputing its finished batches; a changed setting never reuses a stale count."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from test_report import cli_main

import robust.evaluation.report
from robust.errors import RobustError
from robust.evaluation.report import batch_counts
from robust.evaluation.sharding import Journal, World, launch, pending, sharded_counts
from robust.threats import ThreatSpec

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
KEYS = ("clean", "fgsm", "pgd", "square", "targeted_success")  # Square: torchattacks, seeded per batch too


@dataclass(frozen=True)
class Replay(World):
    """Rank ``this`` of two, run alone in this process: ``broadcast`` hands out rank 0's ``work``; rank 1 records what
    it sends, and rank 0 receives those records as rank 1's share of each gather."""

    this: int = 0
    work: list = field(default_factory=list)
    sent: list = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.this

    @property
    def size(self) -> int:
        return 2

    def gather(self, counts):
        if self.this == 1:
            self.sent.append(counts)
            return torch.stack([torch.full_like(counts, -1), counts])
        return torch.stack([counts, self.sent.pop(0)])

    def broadcast(self, obj):
        return self.work if obj is None else obj


def test_two_ranks_split_the_batches_and_sum_to_the_single_process_counts(digits_cnn, digits_val):
    x, y = digits_val
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]  # three batches: rank 0 takes two
    specs = [ThreatSpec(eps, steps=1, threats=KEYS, square_queries=5) for eps in (0.05, 0.1)]
    calls = []

    def count(g, batch, todo):
        calls.append(g)
        return batch_counts(digits_cnn, KEYS, CPU, None, g, batch, todo)

    alone = sharded_counts(batches, specs, count, 1 + len(KEYS), World(CPU), progress=False)
    assert alone[:, 0].tolist() == [12, 12] and calls == [0, 1, 2]
    work = pending(specs, len(batches), None, torch.zeros_like(alone))
    assert work == [(0, [0, 1]), (1, [0, 1]), (2, [0, 1])]
    calls.clear()
    rank1 = Replay(CPU, this=1, work=work)
    sharded_counts(batches, specs, count, 1 + len(KEYS), rank1, progress=False)
    rank0 = Replay(CPU, this=0, work=work, sent=rank1.sent)
    total = sharded_counts(batches, specs, count, 1 + len(KEYS), rank0, progress=False)
    assert calls == [1, 0, 2]  # rank 1 did batch 1, rank 0 batches 0 and 2: each batch once
    assert torch.equal(total, alone)  # the same seeds per batch, integer sums: exactly equal


def test_journal_is_read_back_only_for_the_same_identity_and_spec(tmp_path):
    spec = ThreatSpec(0.1, steps=2)
    Journal(tmp_path, {"model": "a"}).save(spec, 3, 5, [8, 7])
    assert (tmp_path / "eps=0.1" / "shard-3-of-5.json").is_file()
    assert Journal(tmp_path, {"model": "a"}, resume=True).load(spec, 3, 5) == [8, 7]
    assert Journal(tmp_path, {"model": "a"}).load(spec, 3, 5) is None  # not resuming
    assert Journal(tmp_path, {"model": "b"}, resume=True).load(spec, 3, 5) is None
    assert Journal(tmp_path, {"model": "a"}, resume=True).load(ThreatSpec(0.1, steps=3), 3, 5) is None
    assert Journal(tmp_path, {"model": "a"}, resume=True).load(spec, 3, 6) is None
    (tmp_path / "eps=0.1" / "shard-3-of-5.json").write_text("{trunc")
    assert Journal(tmp_path, {"model": "a"}, resume=True).load(spec, 3, 5) is None


class Killed(Exception):
    """Stands for the kill of a report process."""


def report_args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    """A report of 12 images in 3 batches, for 2 eps."""
    return [
        "report",
        "--checkpoint",
        str(ckpt),
        "--data",
        "digits",
        "--eps",
        "0.05",
        "0.1",
        "--limit",
        "12",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def run_report(argv: list[str]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli_main(argv) == 0
    return json.loads((Path(argv[argv.index("--out") + 1]) / "report.json").read_text())


@pytest.mark.slow  # three in-process reports of real PGD/APGD/BPDA batches
def test_killed_report_resumes_without_recomputing_finished_batches(digits_cnn_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "report"
    measured = []  # (batch, eps) of every attacked batch
    real = robust.evaluation.report.predictions

    def predictions(model, x, y, spec, **kwargs):
        measured.append((spec.seed, spec.eps))  # a pass seeds batch b with seed + b; seed is 0
        if len(measured) > kill_at >= 0:
            raise Killed
        return real(model, x, y, spec, **kwargs)

    monkeypatch.setattr(robust.evaluation.report, "predictions", predictions)
    kill_at = 2  # while measuring batch 1: batch 0 is done for both eps
    with pytest.raises(Killed):
        cli_main(report_args(digits_cnn_ckpt, out))
    journal = out / ".cache"
    assert sorted(p.relative_to(journal).as_posix() for p in journal.rglob("*.json")) == [
        "eps=0.05/shard-0-of-3.json",
        "eps=0.1/shard-0-of-3.json",
    ]
    assert not (out / "report.json").exists()

    kill_at = 0  # stop at the first batch measured: with a changed setting, batch 0 (seeded with the seed) again
    for changed, first in ((["--steps", "3"], 0), (["--seed", "1"], 1), (["--limit", "16"], 0)):
        measured.clear()
        with pytest.raises(Killed):
            cli_main(report_args(digits_cnn_ckpt, out, "--resume", *changed))
        assert measured == [(first, 0.05)], changed
    measured.clear()
    with pytest.raises(Killed):
        cli_main(report_args(digits_cnn_ckpt, out))  # without --resume the journal is not read
    assert measured == [(0, 0.05)]

    measured.clear()
    kill_at = -1
    resumed = run_report(report_args(digits_cnn_ckpt, out, "--resume"))
    assert measured == [(1, 0.05), (1, 0.1), (2, 0.05), (2, 0.1)]
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "robustness_curve.png"]
    monkeypatch.setattr(robust.evaluation.report, "predictions", real)
    assert resumed == run_report(report_args(digits_cnn_ckpt, tmp_path / "fresh"))


@pytest.mark.slow  # an integration run (processes or a resumed fit), like the DDP and SIGKILL tests
def test_two_cpu_processes_write_the_single_process_report(resnet18_ckpt, tmp_path):
    """``--devices 2`` on CPU (gloo): each process attacks one of the two batches; rank 0 writes the same report."""
    args = [
        "report",
        "--checkpoint",
        str(resnet18_ckpt),
        "--data",
        "digits",
        "--eps",
        "0.1",
        "--limit",
        "16",
        "--batch-size",
        "8",
        "--steps",
        "1",
        "--device",
        "cpu",
    ]
    single = run_report([*args, "--out", str(tmp_path / "one")])
    # The same kernels in every process: as many threads as this one uses (summation order depends on it).
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(
        [sys.executable, "evaluate.py", *args, "--out", str(tmp_path / "two"), "--devices", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stderr + proc.stdout
    assert json.loads((tmp_path / "two" / "report.json").read_text()) == single
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["report.json", "report.md", "robustness_curve.png"]


def test_launch_refuses_what_cannot_be_split(monkeypatch):
    with pytest.raises(RobustError, match="give the device type 'cuda', not cuda:1"):
        launch(torch.device("cuda:1"), devices=2)
    monkeypatch.setenv("WORLD_SIZE", "4")  # started by torchrun as 4 processes
    with pytest.raises(RobustError, match="one of 4 processes"):
        launch(CPU)
