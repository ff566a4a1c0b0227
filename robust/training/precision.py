"""Training precision that follows the hardware: bf16 autocast only where it is fast.

On a CPU without native bf16 instructions (AVX512-BF16 or AMX, e.g. any AVX2-only machine) torch emulates bf16
and a ``bf16-mixed`` recipe trains many times slower than ``32-true``; such runs fall back to ``32-true``.
"""

from __future__ import annotations

import torch

BF16 = ("bf16", "bf16-mixed", "bf16-true", "transformer-engine")


def cpu_has_native_bf16() -> bool:
    """Whether torch dispatches to native bf16 CPU kernels here: AVX512-BF16 or AMX present *and* in use
    (``ATEN_CPU_CAPABILITY=avx2`` or lower turns them off, as on a machine that lacks them)."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def runs_on_cpu(accelerator: object) -> bool:
    """Whether a Trainer with this ``accelerator`` setting (``auto``, ``cpu``, ``gpu``, ``cuda``, ...) uses the CPU."""
    name = str(getattr(accelerator, "name", accelerator) or "auto").lower()
    if name == "cpu":
        return True
    return name == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()


def resolve_precision(precision: object, accelerator: object) -> tuple[object, str | None]:
    """``(precision to use, one-line notice or None)``: a bf16 precision on a CPU without native bf16 becomes
    ``32-true``; anything else is kept."""
    if str(precision) not in BF16 or not runs_on_cpu(accelerator) or cpu_has_native_bf16():
        return precision, None
    capability = torch.backends.cpu.get_cpu_capability()
    return "32-true", (
        f"precision {precision} -> 32-true: this CPU ({capability}) has no native bf16, where bf16 "
        "autocast is many times slower than float32"
    )
