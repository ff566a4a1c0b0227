"""The machine line that heads every measured table (experiments, benchmarks): a figure is a figure on a named CPU."""

from __future__ import annotations

import datetime
import platform

import torch


def machine(device: torch.device | None = None) -> str:
    """Date, CPU model, torch version, the CPU capability torch dispatches to (AVX2, AVX512, ...), thread count;
    and the GPU when ``device`` is a CUDA device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda" else ""
    capability, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    return f"{datetime.date.today()}, {cpu}, torch {torch.__version__}, capability {capability}, {threads} threads{gpu}"
