"""``benchmarks/gpu_check.py`` on a CPU machine: the one-line no-CUDA exit, the summary table, and the readers of
each step's results (junit properties, the training run's TensorBoard events, the training command itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_benchmarks import load_script

import train as train_cli

ROOT = Path(__file__).resolve().parents[1]


def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU for it, even on a GPU machine
    gc = load_script("gpu_check")
    assert gc.main(["--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.splitlines() == [gc.NO_CUDA]
    assert not (tmp_path / "out").exists()


def test_summary_table_aligns_every_step():
    gc = load_script("gpu_check")
    steps = [
        gc.Step(gc.PYTEST, "ok", 61.25, {"passed": 5, "failed": 0, "jpeg_gpu_cpu_mean_abs_diff_grey_levels_c3": 0.4}),
        gc.Step(gc.BENCH, "failed", 3.04, {}, "exit 2"),
        gc.Step(gc.TRAIN, "not run", note="budget spent"),
    ]
    lines = gc.format_table(steps).splitlines()
    assert lines[0].split() == ["step", "status", "seconds", "key", "figures"]
    assert set(lines[1]) == {"-"} and len(lines) == 2 + len(steps)
    status_at, seconds_end = lines[0].index("status"), lines[0].index("seconds") + len("seconds")
    for line, step, seconds in zip(lines[2:], steps, ("61.2", "3.0", "0.0"), strict=True):
        assert line.startswith(step.name) and line[status_at:].startswith(step.status)
        assert line[:seconds_end].endswith(seconds)
    assert lines[2].endswith("passed 5, failed 0, jpeg_gpu_cpu_mean_abs_diff_grey_levels_c3 0.4")
    assert lines[3].endswith("exit 2") and lines[4].endswith("budget spent")


def test_pytest_figures_come_from_a_real_junit_file(tmp_path):
    """A skipped test counts against the step: on a GPU machine it is a path left unchecked."""
    (tmp_path / "test_fake.py").write_text(
        "import pytest\n"
        "def test_measures(record_property):\n    record_property('diff', 0.5)\n"
        "@pytest.mark.skip(reason='no')\ndef test_skipped():\n    pass\n"
    )
    junit = tmp_path / "junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "junit_family=xunit1",
        f"--junitxml={junit}",
        "--rootdir",
        str(tmp_path),
        str(tmp_path / "test_fake.py"),
    ]
    subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=300, check=True)
    figures, note = load_script("gpu_check").pytest_figures(junit)
    assert figures == {"passed": 1, "failed": 0, "skipped": 1, "diff": 0.5} and note == "not all tests passed"


def test_scalars_reads_the_last_val_values_of_the_newest_run(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for version, values in (("version_0", (0.1, 0.2)), ("version_1", (0.3, 0.4))):
        writer = SummaryWriter(str(tmp_path / "cifar10_fast" / version))
        for step, value in enumerate(values):
            writer.add_scalar("val/pgd", value, step)
            writer.add_scalar("train/loss", 2.0, step)
        writer.close()
    assert load_script("gpu_check").scalars(tmp_path) == {"val/pgd": pytest.approx(0.4)}


def test_training_command_parses_to_one_epoch_on_the_cifar10_subset(shared_data, tmp_path, capsys):
    """The exact command of the training step, resolved by train.py's CLI (``--print_config``; nothing runs)."""
    root = shared_data / "cifar10-subset"
    cmd = load_script("gpu_check").train_command(root, tmp_path)
    assert cmd[:2] == [sys.executable, "train.py"]
    with pytest.raises(SystemExit) as exit_:
        train_cli.main([*cmd[2:], "--print_config"])
    assert not exit_.value.code
    printed = capsys.readouterr().out
    expected = [
        "class_path: robust.data.modules.ImageFolder",
        f"root: {root}",
        "max_epochs: 1",
        "limit_val_batches: 4",
        "accelerator: gpu",
        "precision: bf16-mixed",
        "channels_last: true",
        f"save_dir: {tmp_path}",
    ]
    for line in expected:
        assert line in printed, line
