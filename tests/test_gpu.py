"""The GPU paths, run by ``make gpu-check`` (``pytest -m cuda``): nvjpeg JPEG, bf16 + channels-last training
through Lightning, AutoAttack on CUDA. Each skips without a CUDA GPU; the figures they measure are recorded as
junit properties for ``benchmarks/gpu_check.py``'s summary."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import train as train_cli
from robust.data.modules import ImageFolder
from robust.defenses import jpeg, to_uint8
from robust.evaluation.report import evaluate
from robust.training.module import VAL_KEYS

SKIP_WITHOUT_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cifar_uint8(shared_data) -> torch.Tensor:
    """64 real CIFAR-10 test images, every class, as ``64×3×32×32`` uint8 (the pixels both codecs receive)."""
    dm = ImageFolder(root=str(shared_data / "cifar10-subset"), batch_size=64, num_workers=0, augment=False, limit=64)
    x, _ = next(iter(dm.val_dataloader()))
    return to_uint8(x)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.cuda
@SKIP_WITHOUT_CUDA
def test_nvjpeg_matches_the_cpu_codec_within_one_grey_level(cifar_uint8, channels, record_property):
    """Validation runs JPEG on the GPU, reports often on the CPU: both must be the same defense."""
    pixels = cifar_uint8 if channels == 3 else cifar_uint8.float().mean(1, keepdim=True).round().to(torch.uint8)
    x = pixels.float() / 255
    on_gpu = jpeg(x.cuda(), 75)
    on_cpu = jpeg(x, 75)
    assert on_gpu.shape == x.shape and on_gpu.dtype == x.dtype and on_gpu.device.type == "cuda"
    diff = (to_uint8(on_gpu).cpu().float() - to_uint8(on_cpu).float()).abs().mean().item()
    record_property(f"jpeg_gpu_cpu_mean_abs_diff_grey_levels_c{channels}", round(diff, 3))
    assert diff <= 1.0
    assert (to_uint8(on_gpu).cpu().float() - pixels.float()).abs().mean() > 0  # really re-encoded


@pytest.mark.parametrize(
    ("accelerator", "precision"),
    [
        pytest.param("gpu", "bf16-mixed", marks=[pytest.mark.cuda, SKIP_WITHOUT_CUDA]),
        pytest.param("cpu", "32-true", marks=pytest.mark.slow),
    ],  # the CPU twin: make test-all
)
def test_channels_last_training_steps_through_lightning(tmp_path, accelerator, precision, record_property):
    """A few FGSM-RS training steps and one validation batch of the product's module, as ``train.py`` runs them;
    on CPU in float32 (the fast paths' twin: channels-last only)."""
    args = [
        "fit",
        "--config",
        "configs/digits.yaml",
        "--trainer.accelerator",
        accelerator,
        "--trainer.precision",
        precision,
        "--model.channels_last",
        "true",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.check_val_every_n_epoch",
        "1",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.image_size",
        "16",
        "--image_grid.n",
        "4",
        "--overfit_guard.n",
        "16",
        "--overfit_guard.pgd_steps",
        "2",
        "--model.val_steps",
        "2",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    ]
    cli = train_cli.main(args)
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 3 and trainer.precision == precision
    # Where the steps ran (at the end, fit moves the module back to the CPU).
    assert trainer.strategy.root_device.type == ("cuda" if accelerator == "gpu" else "cpu")
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    loss = float(trainer.callback_metrics["train/loss"])
    record_property(f"train_loss_{precision}", round(loss, 4))
    assert math.isfinite(loss) and loss > 0
    for key in VAL_KEYS:
        assert 0.0 <= float(trainer.callback_metrics[f"val/{key}"]) <= 1.0, key


@pytest.mark.cuda
@SKIP_WITHOUT_CUDA
def test_autoattack_on_cuda_is_no_weaker_than_pgd(digits_cnn, digits_val, record_property):
    """torchattacks' standard AutoAttack through the report code, on 32 digits, on the GPU."""
    model = copy.deepcopy(digits_cnn).cuda()
    x, y = digits_val
    results = evaluate(model, [(x[:32], y[:32])], [0.1], steps=10, autoattack=True, progress=False)
    row = results["rows"][0]
    record_property("autoattack_accuracy", row["autoattack"])
    record_property("pgd_accuracy", row["pgd"])
    assert row["clean"] >= 0.8 and row["pgd"] < row["clean"]  # a comparison worth making
    assert 0.0 <= row["autoattack"] <= row["pgd"] + 1 / 32  # one image of slack: both attacks are randomized
