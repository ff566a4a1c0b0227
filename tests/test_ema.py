"""Weight averaging (``--ema.decay``, robust.training.averaging.WeightEMA): validation, checkpoints, the card and the
export
hold the EMA of the trained weights; a resume continues it; off adds no callback; a guard restore puts it back."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_fit_args
from lightning.pytorch.loggers import TensorBoardLogger
from test_overfit_guard import ScriptedGuard, small_data, small_module

import train
from robust.export.folder import export_model
from robust.files import load_checkpoint
from robust.models.resolve import CARD_KEY, load_model, model_from_ckpt
from robust.training.averaging import WeightEMA, weight_averages

DECAY = 0.5  # a tiny run has a few steps: let each of them count
# --ema.adapt false: the average of these few steps is checked at this decay, not the one it adapts to
EMA_RUN = (
    "--ema.decay",
    str(DECAY),
    "--ema.adapt",
    "false",
    "--model.lr_scheduler",
    "null",
    "--overfit_guard.action",
    "warn",
)


class Recorder(L.Callback):
    """Records ``what(pl_module)`` after every training batch (placed last, after the other callbacks' hooks)."""

    def __init__(self, what) -> None:
        self.what, self.states = what, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append(self.what(pl_module))


def trained_weights(pl_module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def ema(states: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The EMA of a sequence of state dicts, written out in float64: the first, then ``decay·avg + (1 - decay)·next``
    (floating-point entries only)."""
    avg = {k: v.double() for k, v in states[0].items() if v.is_floating_point()}
    for state in states[1:]:
        avg = {k: decay * a + (1 - decay) * state[k].double() for k, a in avg.items()}
    return avg


def assert_matches(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for k, v in expected.items():
        torch.testing.assert_close(state[k].double(), v, rtol=1e-5, atol=1e-6)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b if b[k].is_floating_point())


def last_ckpt(save_dir: Path) -> dict:
    return load_checkpoint(save_dir / "digits" / "version_0" / "checkpoints" / "last.ckpt")


def test_validation_checkpoints_card_and_export_hold_the_ema_of_the_trained_weights(tmp_path):
    cli = train.main(tiny_fit_args(tmp_path, *EMA_RUN, "--trainer.limit_train_batches", "4")[1:], run=False)
    recorder = Recorder(trained_weights)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(recorder.states) == 4
    expected, trained = ema(recorder.states, DECAY), recorder.states[-1]
    assert max_difference(expected, trained) > 1e-3  # the average is not the trained weights
    assert_matches(cli.model.state_dict(), expected)  # training ends with the average in the module
    best = cli.trainer.checkpoint_callback.best_model_path
    for ckpt in (load_checkpoint(best), last_ckpt(tmp_path)):
        assert_matches(ckpt["state_dict"], expected)
        assert all(torch.equal(ckpt["current_model_state"][k], v) for k, v in trained.items())  # for a resume
        assert ckpt[CARD_KEY]["training"]["ema_decay"] == DECAY
    # Validation ran on the average: the card's val/loss is the averaged weights' loss on the one validation batch.
    ckpt = load_checkpoint(best)
    x, y = next(iter(cli.datamodule.val_dataloader()))
    with torch.no_grad():
        averaged_loss = float(F.cross_entropy(model_from_ckpt(ckpt, "averaged")(x), y))
        trained_ckpt = {**ckpt, "state_dict": ckpt["current_model_state"]}
        trained_loss = float(F.cross_entropy(model_from_ckpt(trained_ckpt, "trained")(x), y))
    card_loss = ckpt[CARD_KEY]["robustness"]["metrics"]["loss"]
    assert card_loss == pytest.approx(averaged_loss, rel=1e-4, abs=1e-5)
    assert abs(card_loss - trained_loss) > 1e-3  # the comparison can tell the two apart
    exported = load_model(export_model(best, tmp_path / "export"))
    assert_matches({f"model.{k}": v for k, v in exported.state_dict().items()}, expected)


@pytest.mark.slow  # an integration run (processes or a resumed fit), like the DDP and SIGKILL tests
def test_resume_from_last_continues_the_same_average(tmp_path):
    two_batches = (*EMA_RUN, "--trainer.limit_train_batches", "2")
    train.main(tiny_fit_args(tmp_path / "straight", *two_batches, "--trainer.max_epochs", "2"))
    train.main(tiny_fit_args(tmp_path / "split", *two_batches, "--trainer.max_epochs", "1"))
    train.main(tiny_fit_args(tmp_path / "split", *two_batches, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    straight, resumed = last_ckpt(tmp_path / "straight"), last_ckpt(tmp_path / "split")
    assert int(straight["averaging_state"]["n_averaged"]) == int(resumed["averaging_state"]["n_averaged"]) == 4
    assert max_difference(straight["state_dict"], straight["current_model_state"]) > 1e-3
    for key in ("state_dict", "current_model_state"):  # the average and the trained weights
        assert_matches(resumed[key], {k: v.double() for k, v in straight[key].items() if v.is_floating_point()})


OFF_AND_ON = [
    ((), False),
    (("--ema.decay", "0"), False),
    (("--ema.decay", "null"), False),
    (("--ema.decay", "0.99"), True),
]


@pytest.mark.parametrize(("extra", "averaged"), OFF_AND_ON)
def test_decay_null_or_zero_adds_no_callback(tmp_path, extra, averaged):
    cli = train.main(tiny_fit_args(tmp_path, *extra)[1:], run=False)
    assert [cb.decay for cb in weight_averages(cli.trainer)] == ([0.99] if averaged else [])


def test_bad_decay_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_fit_args(tmp_path, "--ema.decay", "1"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "ema decay must be in [0, 1)" in err and "Traceback" not in err


@pytest.mark.parametrize("action", ["rollback", "stop"])
def test_guard_restore_puts_back_the_average_kept_with_the_weights(tmp_path, action):
    # One batch per epoch. Checks: train start, epoch 0, epoch 1 (the most robust: kept), epoch 2 (collapse: restore).
    guard = ScriptedGuard([(0.1, 0.1), (0.3, 0.35), (0.5, 0.55), (0.05, 0.9)], action=action, n=32)
    averaging = WeightEMA(DECAY)
    recorder = Recorder(lambda _: averaging.average_state())
    module = small_module()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="g"),
        callbacks=[guard, averaging, recorder],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        inference_mode=False,
    )
    with pytest.warns(UserWarning, match="restored the most robust weights"):
        trainer.fit(module, datamodule=small_data())
    assert any(not torch.equal(guard.seen[3]["model"][k], v) for k, v in guard.seen[2]["model"].items())
    kept, after_collapse = recorder.states[1], recorder.states[2]  # the average after epochs 1 and 2
    # Without the restore the last average would be decay·kept + (1 - decay)·(collapsed weights), not kept.
    assert all(torch.equal(after_collapse[k], v) for k, v in kept.items())
    assert_matches(
        module.state_dict(),
        {
            k.removeprefix("module."): v.double()
            for k, v in kept.items()
            if k.startswith("module.") and v.is_floating_point()
        },
    )
