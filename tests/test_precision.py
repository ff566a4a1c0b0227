"""Precision follows the hardware: bf16 autocast only on CUDA or on a CPU with native bf16."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robust import precision

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize(
    ("asked", "accelerator", "falls_back_without_native"),
    [("bf16-mixed", "cpu", True), ("bf16-true", "cpu", True), ("bf16-mixed", "cuda", False),
     ("32-true", "cpu", False), ("16-mixed", "gpu", False)],
)  # fmt: skip
def test_bf16_on_a_cpu_without_native_bf16_becomes_32_true(monkeypatch, native, asked, accelerator,
                                                           falls_back_without_native):  # fmt: skip
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    used, notice = precision.resolve_precision(asked, accelerator)
    if falls_back_without_native and not native:
        assert used == "32-true" and "no native bf16" in notice and asked in notice
    else:
        assert (used, notice) == (asked, None)


def test_auto_accelerator_without_cuda_counts_as_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert precision.resolve_precision("bf16-mixed", "auto")[0] == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision.resolve_precision("bf16-mixed", "auto")[0] == "bf16-mixed"


def test_native_bf16_needs_avx512_dispatch(monkeypatch):
    """An AVX512-BF16 CPU imitating AVX2 (``ATEN_CPU_CAPABILITY=avx2``) runs bf16 without native kernels."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not precision.cpu_has_native_bf16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert precision.cpu_has_native_bf16()


def test_train_cli_prints_the_fallback_and_trains_in_float32(tmp_path):
    """A ``bf16-mixed`` run on this machine's CPU: on a CPU without native bf16 the CLI says so and trains 32-true."""
    code = "import sys, train; cli = train.main(sys.argv[1:]); print('PRECISION', cli.trainer.precision)"
    args = ["fit", "--config", "configs/digits.yaml", "--trainer.precision", "bf16-mixed", "--trainer.accelerator",
            "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches",
            "0", "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "8",
            "--data.init_args.image_size", "8", "--overfit_guard.n", "4", "--overfit_guard.pgd_steps", "1",
            "--trainer.logger.init_args.save_dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    native = precision.cpu_has_native_bf16()
    assert ("no native bf16" in proc.stdout) is not native
    assert f"PRECISION {'bf16-mixed' if native else '32-true'}" in proc.stdout
