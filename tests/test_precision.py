"""Precision follows the hardware: bf16 autocast only on CUDA or on a CPU with native bf16."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_fit_args

import train
from robust.training import precision


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize(
    ("asked", "accelerator", "falls_back_without_native"),
    [
        ("bf16-mixed", "cpu", True),
        ("bf16-true", "cpu", True),
        ("bf16-mixed", "cuda", False),
        ("32-true", "cpu", False),
        ("16-mixed", "gpu", False),
    ],
)
def test_bf16_on_a_cpu_without_native_bf16_becomes_32_true(
    monkeypatch, native, asked, accelerator, falls_back_without_native
):
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


def test_train_cli_prints_the_fallback_and_trains_in_float32(tmp_path, capsys):
    """A ``bf16-mixed`` run on this machine's CPU: on a CPU without native bf16 the CLI says so and trains 32-true."""
    cli = train.main(tiny_fit_args(tmp_path, "--trainer.precision", "bf16-mixed", "--trainer.accelerator", "cpu"))
    native = precision.cpu_has_native_bf16()
    assert ("no native bf16" in capsys.readouterr().out) is not native
    assert cli.trainer.precision == ("bf16-mixed" if native else "32-true")
