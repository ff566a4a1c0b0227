"""Faults and determinism: SIGKILL mid-epoch then resume == uninterrupted; seeded runs are identical; DDP syncs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from robust import load_model
from robust.data.modules import Digits
from robust.fast_path import fast_model
from robust.files import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # whole training runs in fresh processes: `make test-all`
SMALL = [
    "--trainer.max_epochs",
    "4",
    "--trainer.limit_train_batches",
    "8",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--data.init_args.batch_size",
    "32",
    "--image_grid.n",
    "2",
    "--model.val_steps",
    "2",
    "--trainer.check_val_every_n_epoch",
    "2",
]
STEPS = 4 * 8  # max_epochs x limit_train_batches
WAIT_S = 900  # the most a killed run may take to reach its stall (a generous bound on a loaded machine)


def command(save_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "fit",
        "--config",
        "configs/digits.yaml",
        *SMALL,
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        *extra,
    ]


def final_state(save_dir: Path) -> tuple[dict, dict[int, float]]:
    run = save_dir / "digits" / "version_0"
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    events = EventAccumulator(str(run))
    events.Reload()
    return ckpt["state_dict"], {e.step: e.value for e in events.Scalars("val/pgd")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a")
    proc = subprocess.run(command(out), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_weights(state_a: dict, state_b: dict) -> None:
    assert state_a.keys() == state_b.keys()
    different = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_same_run(a: Path, b: Path) -> None:
    state_a, pgd_a = final_state(a)
    state_b, pgd_b = final_state(b)
    assert load_checkpoint(a / "digits" / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == STEPS
    assert_same_weights(state_a, state_b)
    assert pgd_a == pgd_b


def test_two_seeded_runs_are_identical(uninterrupted, tmp_path):
    proc = subprocess.run(command(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(uninterrupted, tmp_path)


def test_validation_frequency_does_not_change_training(uninterrupted, tmp_path):
    """Validating every epoch instead of every 2nd leaves the training trajectory bit-identical (the validation
    loader draws its worker seed from its own generator, not from the global RNG that shuffles and attacks)."""
    proc = subprocess.run(
        command(tmp_path, "--trainer.check_val_every_n_epoch", "1"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (state_a, _), (state_b, pgd_b) = final_state(uninterrupted), final_state(tmp_path)
    assert len(pgd_b) == 4
    assert_same_weights(state_a, state_b)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(uninterrupted, tmp_path):
    """Killed (SIGKILL) after step 12, half way through the second epoch (tests/stall.py holds it there and says so
    in a file: an event, not a sleep), then resumed from ``last``: the same weights and val/pgd as the run never
    killed."""
    last = tmp_path / "digits" / "version_0" / "checkpoints" / "last.ckpt"
    marker = tmp_path / "stalled"
    stall = json.dumps(
        {"class_path": "tests.stall.StallAtStep", "init_args": {"step": STEPS // 4 + 4, "marker": str(marker)}}
    )
    cmd = command(tmp_path, f"--trainer.callbacks+={stall}")
    log = tmp_path / "killed.log"
    with log.open("w") as out:  # a file, not a pipe: a full pipe would block the run before its stall
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + WAIT_S
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # a poll of the event, bounded by WAIT_S
    assert marker.exists() and proc.poll() is None, f"the run did not reach step 12: {log.read_text()[-3000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(last)["global_step"] == STEPS // 4  # the first epoch's, before the kill
    resumed = subprocess.run([*cmd, "--ckpt_path", "last"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(uninterrupted, tmp_path)


def test_ddp_on_two_cpu_processes_syncs_validation(tmp_path):
    """DDP (gloo) validates half of the 360 images per process; the logged val/clean is the whole set's."""
    args = [
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_val_batches",
        "1.0",
        "--trainer.check_val_every_n_epoch",
        "1",
    ]
    proc = subprocess.run(command(tmp_path, *args), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "digits" / "version_0"
    events = EventAccumulator(str(run))
    events.Reload()
    logged = events.Scalars("val/clean")[-1].value
    model = load_model(run / "checkpoints" / "last.ckpt")
    dm = Digits(image_size=model.card.image_size)
    dm.setup()
    x, y = dm.val_set.tensors
    with torch.no_grad():  # validation measures the epoch's fast-path copy: a one-epoch model has near-tied logits
        full = (fast_model(model)(x).argmax(1) == y).float().mean().item()
    assert logged == pytest.approx(full, abs=1e-6)
