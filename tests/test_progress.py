"""A run you can follow and a best model that is a model: progress lines where stdout is no terminal, one line on an
interrupt, the not-learned rule in the checkpoint choice, the closing lines and the card, the small-data line."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_ARCH_ARGS

import train
from robust.files import load_checkpoint
from robust.learned import small_data_advice
from robust.models.resolve import CARD_KEY
from robust.training.checkpointing import BestCheckpoint
from robust.training.progress import LineProgress, NamedRichBar, named_fields, progress_bar, resume_command

ROOT = Path(__file__).resolve().parents[1]


def fake_trainer(**kw) -> SimpleNamespace:
    base = {
        "global_step": 0,
        "estimated_stepping_batches": 40,
        "current_epoch": 0,
        "max_epochs": 4,
        "num_training_batches": 10,
        "progress_bar_metrics": {},
        "callback_metrics": {},
        "sanity_checking": False,
        "optimizers": [SimpleNamespace(param_groups=[{"lr": 0.01}, {"lr": 0.1}])],
        "check_val_every_n_epoch": 1,
        "limit_val_batches": 1.0,
    }
    return SimpleNamespace(**{**base, **kw})


def test_lines_come_every_n_steps_and_at_each_epoch_end_with_every_field(capsys):
    bar, trainer = LineProgress(every_n_steps=4, every_seconds=1e9), fake_trainer()
    bar.on_train_start(trainer, None)
    batch = (torch.zeros(8, 1), torch.zeros(8))
    for i in range(10):
        bar.on_train_batch_start(trainer, None, batch, i)
        trainer.global_step += 1
        trainer.progress_bar_metrics = {"train/loss": torch.tensor(1.5), "v_num": 0}
        bar.on_train_batch_end(trainer, None, None, batch, i)
    trainer.progress_bar_metrics["train/adv"] = torch.tensor(0.25)
    bar.on_train_epoch_end(trainer, None)
    lines = capsys.readouterr().out.splitlines()
    # steps 4 and 8 within the epoch, then the epoch's own line (not a second one for its last batch)
    assert [re.search(r"step (\d+)/40", line).group(1) for line in lines] == ["4", "8", "10"]
    assert lines[0].startswith("epoch 0/3  step 4/40  loss 1.5000  lr 0.1  ") and "train-attack" not in lines[0]
    assert "train-attack acc 0.250" in lines[2] and re.search(r" \d+(\.\d)? img/s  ETA \d+", lines[2])


def test_a_validation_is_one_line_with_clean_and_every_worst_case(capsys):
    bar = LineProgress()
    metrics = {"val/clean": torch.tensor(0.8), "val/pgd_worst": torch.tensor(0.4), "val/jpeg_worst": 0.3}
    trainer = fake_trainer(callback_metrics={**metrics, "val/fgsm": 0.5, "val/loss": 1.0}, current_epoch=2)
    bar.on_validation_start(trainer, None)
    bar.on_validation_end(trainer, None)
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("validation after epoch 2: clean 0.800  pgd_worst 0.400  jpeg_worst 0.300  (")


def test_a_terminal_keeps_the_rich_bar_with_named_fields_a_log_gets_lines():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert type(progress_bar(Tty())) is NamedRichBar and type(progress_bar(io.StringIO())) is LineProgress
    assert named_fields({"v_num": 0, "train/adv": 0.5, "train/loss": 1.0}) == {"train-attack acc": 0.5, "loss": 1.0}


def test_the_resume_command_is_the_run_with_ckpt_path_last():
    args = ["fit", "--config", "configs/my data.yaml", "--ckpt_path", "old.ckpt", "--trainer.max_epochs", "3"]
    expected = "python train.py fit --config 'configs/my data.yaml' --trainer.max_epochs 3 --ckpt_path last"
    assert resume_command(args) == expected


def checkpoint_choice(tmp_path) -> tuple[BestCheckpoint, object]:
    """A BestCheckpoint whose saves only record their paths, and the trainer stand-in its choice reads."""
    cb = BestCheckpoint(monitor="val/pgd_worst", mode="max", dirpath=str(tmp_path), filename="best-{epoch}")
    cb._save_checkpoint = lambda trainer, path: setattr(cb, "_last_checkpoint_saved", path)
    cb._remove_checkpoint = lambda trainer, path: None
    module = SimpleNamespace(hparams={"num_classes": 4, "norm": "linf"})
    strategy = SimpleNamespace(broadcast=lambda x, src=0: x, reduce_boolean_decision=lambda x, all=True: x)
    return cb, SimpleNamespace(lightning_module=module, strategy=strategy, is_global_zero=True, ckpt_path=None)


def test_the_best_checkpoint_is_never_a_model_that_has_not_learned_over_one_that_has(tmp_path):
    cb, trainer = checkpoint_choice(tmp_path)

    def validate(epoch: int, clean: float, worst: float, top: float = 0.3) -> str:
        metrics = {"val/clean": clean, "val/pgd_worst": worst, "val/top_class": top, "epoch": epoch, "step": epoch}
        cb._save_monitor_checkpoint(trainer, {k: torch.tensor(v) for k, v in metrics.items()})
        return Path(cb.best_model_path).name

    # the run: a constant classifier on 4 balanced classes keeps 25% under attack
    assert validate(0, 0.25, 0.2292, top=1.0) == "best-epoch=0.ckpt" and "one class" in cb.best_not_learned()
    assert cb.real_score() == pytest.approx(0.2292, abs=1e-6)  # as measured, for the closing lines and the card
    assert validate(1, 0.25, 0.25, top=1.0) == "best-epoch=1.ckpt"  # among those that have not learned: by score
    assert cb.real_score() == pytest.approx(0.25, abs=1e-6)
    assert validate(2, 0.60, 0.10) == "best-epoch=2.ckpt" and cb.best_not_learned() is None
    assert validate(3, 0.30, 0.30) == "best-epoch=2.ckpt"  # clean 0.30: within 10 points of chance 0.25
    assert validate(4, 0.70, 0.20) == "best-epoch=4.ckpt" and cb.real_score() == pytest.approx(0.2)
    cb.learned_first = False
    assert validate(5, 0.26, 0.9, top=1.0) == "best-epoch=5.ckpt"  # by the monitor alone


def test_small_data_is_told_what_to_change_and_enough_data_is_not():
    # the folder: 240 PNGs of 4 classes, 192 to train on, at configs/imagefolder.yaml's batch 128
    line = small_data_advice(192, 128, 16, pretrained=False, augment=True)
    assert "192 training images at batch 128 make 2 optimizer step(s) an epoch, 16 in this run" in line
    assert "--data.init_args.batch_size 16 (12 an epoch) with --trainer.max_epochs 17" in line
    assert "configs/imagefolder_finetune.yaml" in line and "augment" not in line
    assert "--data.init_args.augment true" in small_data_advice(192, 128, 16, pretrained=False, augment=False)
    assert small_data_advice(1437, 64, 230, pretrained=False) is None  # digits: 23 steps an epoch
    assert small_data_advice(5050, 128, 600, pretrained=False, augment=True) is None  # the CIFAR-10 subset


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[str, Path]:
    """One tiny epoch of :func:`conftest.tiny_cnn` on digits, stdout a pipe (not a terminal): the run's stdout and
    version folder."""
    tmp = tmp_path_factory.mktemp("logs")
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "digits.yaml"),
        *TINY_ARCH_ARGS,
        *("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"),
        *("--trainer.check_val_every_n_epoch", "1", "--data.init_args.batch_size", "16"),
        *("--data.init_args.image_size", "8", "--model.val_steps", "1", "--image_grid.n", "2"),
        *("--overfit_guard.n", "4", "--trainer.logger.init_args.save_dir", str(tmp)),
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.main(args)
    return out.getvalue(), tmp / "digits" / "version_0"


def test_a_log_gets_a_line_per_epoch_and_per_validation(tiny_run):
    stdout, _ = tiny_run
    assert len(re.findall(r"^epoch 0/0  step 2/2  loss [\d.]+  train-attack acc [\d.]+  lr ", stdout, re.M)) == 1
    assert len(re.findall(r"^validation after epoch 0: clean [\d.]+  pgd_worst [\d.]+  jpeg_worst", stdout, re.M)) == 1
    assert re.search(r"^model: 330 trainable parameters \(0.0 MB\)$", stdout, re.M)  # tiny_cnn's, 1.3 kB
    assert re.search(r"^device: cpu \(", stdout, re.M) and "FLOPs" not in stdout and "v_num" not in stdout


def test_a_model_at_chance_is_said_in_the_closing_lines_and_the_card(tiny_run):
    """Two steps on 16 images learn nothing (one class for every validation image): the closing lines say so in one
    line with what to change, and the checkpoint's card carries the same flag."""
    stdout, version = tiny_run
    lines = stdout.splitlines()
    best = next(i for i, line in enumerate(lines) if line.startswith("Best checkpoint (val/pgd_worst = "))
    assert lines[best + 1].startswith("Not learned: the model ") and "--data.init_args.batch_size" in lines[best + 1]
    card = load_checkpoint(version / "checkpoints" / "last.ckpt")[CARD_KEY]["robustness"]
    assert card["not_learned"] and "top_class" in card["metrics"]


@pytest.mark.slow
def test_sigterm_ends_with_what_was_saved_and_the_command_that_resumes(tmp_path):
    """A real signal to a real process with a pipe for stdout: the last line names last.ckpt and the resume
    command, the exit code is 128 + SIGTERM."""
    args = [
        sys.executable,
        "train.py",
        "fit",
        "--config",
        "configs/digits.yaml",
        *("--trainer.max_epochs", "50", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0"),
        *("--data.init_args.batch_size", "16", "--data.init_args.image_size", "8", "--overfit_guard.n", "4"),
        *("--trainer.logger.init_args.save_dir", str(tmp_path)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch 1/49") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    last = (rest or "".join(seen)).strip().splitlines()[-1]
    assert proc.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
    assert last.startswith("interrupted (SIGTERM) at epoch ") and "checkpoints/last.ckpt (epoch " in last
    assert last.endswith("--trainer.logger.init_args.save_dir " + str(tmp_path) + " --ckpt_path last")
