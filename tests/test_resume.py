"""Resuming and the end of a run, as a user meets them: ``train.py fit`` (tiny digits runs of a few seconds each,
in this process), and the schedule rebuild and config comparison of :mod:`robust.training.resume` against torch's own
schedules."""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_ARCH_ARGS
from torch.optim.lr_scheduler import OneCycleLR

import train
from robust.data.roots import resolve_data_root
from robust.errors import RobustError
from robust.files import load_checkpoint
from robust.training.optim import Cosine, Cyclic, OneCycle, Piecewise
from robust.training.resume import check_resume_config, config_differences, rebuild_schedule

ROOT = Path(__file__).resolve().parents[1]
# digits.yaml as it is (validation every 10 epochs, one-cycle schedule), made tiny: the tiny CNN, one batch of 64
# images of 8×8 per epoch, one validation batch with PGD-2.
TINY = [
    *TINY_ARCH_ARGS,
    "--data.init_args.limit",
    "64",
    "--data.init_args.image_size",
    "8",
    "--trainer.limit_val_batches",
    "1",
    "--model.val_steps",
    "2",
    "--image_grid.n",
    "2",
    "--overfit_guard.n",
    "8",
    "--overfit_guard.pgd_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


def fit(logs: Path, *extra: str) -> subprocess.CompletedProcess:
    """``train.py fit --config configs/digits.yaml`` (tiny), logging under ``logs``, in this process: its exit code,
    stdout, and stderr with Lightning's log lines (where the resume notices go). A new interpreter's start-up is not
    the behaviour under test: the slow test_reliability.py and test_fool.py's real-process test run real processes."""
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "digits.yaml"),
        *TINY,
        "--trainer.logger.init_args.save_dir",
        str(logs),
        *extra,
    ]
    out, err = io.StringIO(), io.StringIO()
    handler, log = logging.StreamHandler(err), logging.getLogger("lightning.pytorch")
    log.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                train.main(args)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        log.removeHandler(handler)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """A finished 1-epoch run of digits.yaml, which validates only every 10 epochs."""
    logs = tmp_path_factory.mktemp("logs")
    proc = fit(logs, "--trainer.max_epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (logs / "stdout.txt").write_text(proc.stdout)
    return logs


def test_a_run_shorter_than_the_validation_interval_validates_at_its_end_and_names_its_files(one_epoch):
    stdout = (one_epoch / "stdout.txt").read_text()
    run = one_epoch / "digits" / "version_0"
    best = list((run / "checkpoints").glob("best-epoch000-*.ckpt"))
    assert len(best) == 1
    assert f"TensorBoard logs: {run}" in stdout
    assert "Best checkpoint (val/pgd_worst = " in stdout and str(best[0]) in stdout
    assert f"Last checkpoint: {run / 'checkpoints' / 'last.ckpt'}" in stdout
    # the stable paths of the latest run
    assert (one_epoch / "digits" / "best.ckpt").resolve() == best[0].resolve()
    assert (one_epoch / "digits" / "last.ckpt").resolve() == (run / "checkpoints" / "last.ckpt").resolve()


def test_extending_a_finished_one_cycle_run_continues_on_a_rebuilt_schedule(one_epoch, tmp_path):
    logs = tmp_path / "logs"
    import shutil

    shutil.copytree(one_epoch, logs)
    # Before: torch's "ValueError: Tried to step 2 times. The specified number of total steps is 1" (a traceback).
    proc = fit(logs, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "the one-cycle learning-rate schedule was built for 1 steps; rebuilt for this run's 2" in output
    assert "Traceback" not in output
    last = load_checkpoint(logs / "digits" / "version_0" / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 1 and last["global_step"] == 2
    assert last["lr_schedulers"][0]["total_steps"] == 2
    assert "Best checkpoint (val/pgd_worst = " in proc.stdout  # the new last epoch validated too
    assert not (logs / "digits" / "version_1").exists()  # resumed in place


def test_resuming_with_other_settings_is_one_line_naming_them(one_epoch):
    before = (one_epoch / "digits" / "version_0" / "config.yaml").read_text()
    proc = fit(
        one_epoch, "--trainer.max_epochs", "3", "--model.eps", "0.1", "--model.adv_ratio", "0.5", "--ckpt_path", "last"
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert "model.eps (0.14 -> 0.1)" in line and "model.adv_ratio (1.0 -> 0.5)" in line
    assert "max_epochs" not in line and "--accept_config_changes true" in line
    assert (one_epoch / "digits" / "version_0" / "config.yaml").read_text() == before  # nothing touched


@pytest.mark.slow
def test_accepted_changes_resume_with_the_new_settings(one_epoch, tmp_path):
    import shutil

    logs = tmp_path / "logs"
    shutil.copytree(one_epoch, logs)
    proc = fit(
        logs,
        "--trainer.max_epochs",
        "2",
        "--model.eps",
        "0.1",
        "--ckpt_path",
        "last",
        "--accept_config_changes",
        "true",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with max_epochs 1 -> 2, model.eps 0.14 -> 0.1" in proc.stdout
    saved = yaml.safe_load((logs / "digits" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["eps"] == 0.1


def test_a_missing_data_root_is_one_line_naming_the_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("ROBUST_DATA", raising=False)
    missing = str(tmp_path / "nowhere" / "cifar10-subset")
    args = ["--data.init_args.root", missing, "--trainer.logger.init_args.save_dir", str(tmp_path)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        train.main(["fit", "--config", str(ROOT / "configs" / "imagefolder.yaml"), *args])
    proc = subprocess.CompletedProcess(args, exit_.value.code, out.getvalue(), err.getvalue())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert "--data.init_args.root /path/to/cifar10-subset" in line and "ROBUST_DATA" in line


def test_data_roots_fall_back_to_robust_data(tmp_path, monkeypatch):
    (tmp_path / "cifar10-subset").mkdir()
    monkeypatch.setenv("ROBUST_DATA", str(tmp_path))
    root, notice = resolve_data_root("../not-here/data/cifar10-subset")
    assert root == str(tmp_path / "cifar10-subset") and "ROBUST_DATA" in notice
    assert resolve_data_root(str(tmp_path)) == (str(tmp_path), None)  # as given when it exists
    assert resolve_data_root("data/cifar10", downloads=True) == ("data/cifar10", None)  # downloads itself
    with pytest.raises(RobustError, match="holds no images/"):
        resolve_data_root("data/images")


# ---- the pieces, against torch ---------------------------------------------------------------------


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)


def _stepped(scheduler, n: int):
    for _ in range(n):
        scheduler.optimizer.step()
        scheduler.step()
    return scheduler


@pytest.mark.parametrize("three_phase", [False, True])
def test_a_rebuilt_one_cycle_schedule_is_the_one_built_for_the_new_length(three_phase):
    kwargs = {"max_lr": 0.1, "pct_start": 0.4, "anneal_strategy": "linear", "three_phase": three_phase}
    factory = partial(OneCycleLR, **kwargs)
    old = _stepped(factory(_optimizer(), total_steps=20), 20)  # a finished run
    rebuilt, notice = rebuild_schedule(old, lambda opt, n: factory(opt, total_steps=n), 30)
    assert "built for 20 steps; rebuilt for this run's 30 (at step 20" in notice
    fresh = _stepped(factory(_optimizer(), total_steps=30), 20)
    for _ in range(10):  # where torch raised "Tried to step 21 times"
        assert old.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.optimizer.param_groups[0]["lr"])
        assert old.optimizer.param_groups[0]["momentum"] == pytest.approx(fresh.optimizer.param_groups[0]["momentum"])
        _stepped(rebuilt, 1), _stepped(fresh, 1)
    assert rebuild_schedule(rebuilt, lambda opt, n: factory(opt, total_steps=n), 30) is None  # fits now


@pytest.mark.parametrize(
    "schedule", [partial(Cyclic, peak_at=0.4), partial(Piecewise, milestones=(0.5, 0.75)), Cosine, OneCycle]
)
def test_a_rebuilt_run_fraction_schedule_is_the_one_built_for_the_new_length(schedule):
    old = _stepped(schedule(_optimizer(), 20), 20)  # a finished run
    rebuilt, notice = rebuild_schedule(old, schedule, 40)
    assert "learning-rate schedule was built for 20 steps; rebuilt for this run's 40 (at step 20" in notice
    fresh = _stepped(schedule(_optimizer(), 40), 20)
    assert rebuilt.last_epoch == fresh.last_epoch and rebuilt.optimizer is old.optimizer
    lrs = []
    for _ in range(20):
        assert old.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.optimizer.param_groups[0]["lr"])
        lrs.append(old.optimizer.param_groups[0]["lr"])
        _stepped(rebuilt, 1), _stepped(fresh, 1)
    assert len(set(lrs)) > 1  # the second half of the longer run is not flat: the comparison can fail


def test_only_the_run_length_may_differ():
    saved = {
        "trainer": {"max_epochs": 10, "max_steps": -1, "logger": {"init_args": {"version": None}}},
        "model": {"eps": 0.14, "mean": [0.5, 0.5]},
        "ckpt_path": None,
    }
    given = {
        "trainer": {"max_epochs": 12, "max_steps": 500, "logger": {"init_args": {"version": 3}}},
        "model": {"eps": 0.14, "mean": [0.5, 0.4], "beta": 6},
        "ckpt_path": "last",
    }
    assert config_differences(saved, given) == {"model.mean": ([0.5, 0.5], [0.5, 0.4]), "model.beta": (None, 6)}


def test_the_saved_config_decides(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_epochs": 10}, "model": {"eps": 0.14}}))
    assert check_resume_config(tmp_path, {"trainer": {"max_epochs": 10}, "model": {"eps": 0.14}}, False) is None
    longer = check_resume_config(tmp_path, {"trainer": {"max_epochs": 12}, "model": {"eps": 0.14}}, False)
    assert longer == f"resuming {tmp_path} with max_epochs 10 -> 12"
    with pytest.raises(RobustError, match=r"model.eps \(0.14 -> 0.2\)"):
        check_resume_config(tmp_path, {"trainer": {"max_epochs": 12}, "model": {"eps": 0.2}}, False)
    assert "model.eps 0.14 -> 0.2" in check_resume_config(tmp_path, {"model": {"eps": 0.2}, "trainer": {}}, True)
    assert check_resume_config(tmp_path / "elsewhere", {}, False) is None  # no saved config: nothing to compare
