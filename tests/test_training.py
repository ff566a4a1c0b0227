"""train.py end to end: LightningCLI run on digits, TensorBoard scalars and images, checkpoints, resume."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCH_ARGS, tiny_fit_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train as train_cli
from robust.errors import RobustError
from robust.files import load_checkpoint
from robust.models.build import head_of
from robust.training.module import VAL_KEYS
from robust.training.run_record import split_rng_by_rank

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_ARCH_ARGS,
    "--trainer.limit_train_batches",
    "4",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--data.init_args.batch_size",
    "32",
    "--data.init_args.image_size",
    "8",
    "--model.val_steps",
    "2",
    "--image_grid.n",
    "4",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.check_val_every_n_epoch",
    "1",
]


def train(tmp: Path, *extra: str) -> tuple[int, str, str, train_cli.RobustCLI | None]:
    """``train.py fit`` on the digits config, in this process (a user's run, without a new interpreter's start-up);
    returns (exit code, stdout, stderr, the CLI object when it ran)."""
    out, err = io.StringIO(), io.StringIO()
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "digits.yaml"),
        *TINY,
        "--trainer.logger.init_args.save_dir",
        str(tmp),
        *extra,
    ]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli, code = train_cli.main(args), 0
        except SystemExit as exc:
            cli, code = None, exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue(), cli


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("logs")
    code, stdout, stderr, _ = train(
        tmp, "--trainer.max_epochs", "2", "--model.adv_ratio", "0.5", "--model.lr_scheduler", "null"
    )
    assert code == 0, stderr[-3000:]
    assert "Best checkpoint" in stdout and "tensorboard --logdir" in stdout
    return tmp / "digits" / "version_0"


def test_tensorboard_events_hold_every_metric_and_an_image(run):
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {f"val/{k}" for k in VAL_KEYS} | {"val/loss", "train/loss", "train/clean", "train/adv"}
    assert expected <= scalars, expected - scalars
    for key in expected:
        assert all(0 <= e.value <= 1 for e in events.Scalars(key)) or "loss" in key
    assert "val/images" in events.Tags()["images"]
    assert len(events.Images("val/images")) == 2  # one grid per validation epoch


def test_image_grid_n_0_logs_the_scalars_and_no_image(tmp_path):
    train_cli.main(tiny_fit_args(tmp_path))  # --image_grid.n 0
    events = EventAccumulator(str(tmp_path / "digits" / "version_0"))
    events.Reload()
    assert "val/pgd_worst" in events.Tags()["scalars"] and events.Tags()["images"] == []


def test_checkpoints_and_resolved_config(run):
    ckpts = run / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert len(list(ckpts.glob("best-epoch*-pgd*.ckpt"))) == 1
    config = (run / "config.yaml").read_text()
    assert "adv_ratio: 0.5" in config and "robust.data.modules.Digits" in config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_WAIT_S = 600  # the most a TensorBoard server may take to answer: a bound for a loaded machine, not a speed


def test_real_tensorboard_server_lists_the_scalar_tags(run):
    """A real ``tensorboard`` server on the run's folder lists its scalar tags (polled until it answers, or exits)."""
    port = _free_port()
    exe = Path(sys.executable).with_name("tensorboard")
    server = subprocess.Popen(
        [str(exe), "--logdir", str(run), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, tags = time.monotonic() + SERVER_WAIT_S, None
        while time.monotonic() < deadline and tags is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    tags = json.load(r)
            except OSError:
                assert server.poll() is None, "tensorboard exited"
                time.sleep(0.2)
        assert tags is not None, "tensorboard did not answer"
        run_tags = set().union(*(t.keys() for t in tags.values()))
        assert {"val/pgd", "val/clean", "val/bpda_pgd", "train/loss"} <= run_tags
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_resume_from_last(run, tmp_path):
    import shutil

    shutil.copytree(run.parent, tmp_path / "digits")
    # Train one epoch longer than the first run (a one-cycle schedule could not be extended; constant can).
    code, _, stderr, cli = train(
        tmp_path,
        "--trainer.max_epochs",
        "3",
        "--model.adv_ratio",
        "0.5",
        "--model.lr_scheduler",
        "null",
        "--ckpt_path",
        "last",
    )
    assert code == 0, stderr[-3000:]
    last = tmp_path / "digits" / "version_0" / "checkpoints" / "last.ckpt"
    assert cli.trainer.ckpt_path == str(last) and load_checkpoint(last)["epoch"] == 2
    events = EventAccumulator(str(tmp_path / "digits" / "version_0"))
    events.Reload()
    # epochs 0 and 1 from the first run, epoch 2 resumed (Lightning may repeat the restored epoch's validation)
    assert len({e.step for e in events.Scalars("val/pgd")}) == 3


def test_bad_override_is_one_clear_error(tmp_path):
    code, _, stderr, _ = train(tmp_path, "--model.not_a_key", "1")
    assert code == 2 and "not_a_key" in stderr
    code, _, stderr, _ = train(tmp_path, "--model.eps", "2")
    assert code == 2 and "eps must be in [0, 1]" in stderr and "Traceback" not in stderr
    code, _, stderr, _ = train(tmp_path, "--ckpt_path", "last")
    assert code == 2 and "no last.ckpt" in stderr
    # Raised inside the data module's __init__, which jsonargparse wraps in its own ValueError
    code, _, stderr, _ = train(tmp_path, "--data.init_args.image_size", "0")
    assert code == 2 and stderr.strip() == "error: image_size must be at least 1 pixel, got 0"


def test_a_diverged_run_stops_at_the_first_nan_loss_with_one_line_and_no_checkpoint(tmp_path):
    args = [
        "--config",
        str(ROOT / "configs" / "digits.yaml"),
        *TINY,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    ]
    cli = train_cli.main(args, run=False)
    with torch.no_grad():  # NaN weights give a NaN loss at the first step on any CPU, by IEEE arithmetic
        head_of(cli.model.model).weight.fill_(float("nan"))
    with pytest.raises(RobustError) as caught:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert str(caught.value) == (
        "the training loss is nan at step 0 (epoch 0): training diverged; lower the learning "
        "rate (--model.optimizer.lr)"
    )
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_config_parses(config, capsys):
    """Each shipped config resolves against the current code (``--print_config`` parses, nothing is built)."""
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["fit", "--config", str(ROOT / "configs" / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: robust.data." in out and "overfit_guard:" in out


@pytest.mark.slow
def test_fast_cifar10_recipe_trains_on_the_shared_subset(shared_data, tmp_path):
    """configs/cifar10_fast.yaml as shipped (bf16 autocast, channels-last, FGSM-RS, guard with rollback), its data
    swapped for the shared CIFAR-10 subset, two batches: the recipe's fast paths run through the product."""
    root = str(shared_data / "cifar10-subset")
    data = [
        "--data.class_path",
        "robust.data.modules.ImageFolder",
        "--data.init_args.root",
        root,
        "--data.init_args.batch_size",
        "16",
        "--data.init_args.num_workers",
        "0",
    ]
    small = [
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--overfit_guard.n",
        "16",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
    ]
    cmd = [
        sys.executable,
        "train.py",
        "fit",
        "--config",
        "configs/cifar10_fast.yaml",
        *data,
        *small,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "cifar10_fast" / "version_0"
    events = EventAccumulator(str(run))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"val/pgd", "guard/pgd", "train/loss"} <= set(tags), tags
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_each_ddp_rank_draws_its_own_random_starts():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    draws = []
    for rank in range(2):
        torch.set_rng_state(state)  # every rank starts from the same seed_everything state
        split_rng_by_rank(rank, 2)
        draws.append(torch.rand(8))
    assert not torch.equal(draws[0], draws[1])
    torch.set_rng_state(state)
    split_rng_by_rank(1, 2)
    assert torch.equal(torch.rand(8), draws[1])  # reproducible from the shared state
    torch.set_rng_state(state)
    split_rng_by_rank(0, 1)
    assert torch.equal(torch.get_rng_state(), state)  # one process: untouched
