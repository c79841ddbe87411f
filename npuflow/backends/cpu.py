"""CPU backend: aten int8 weight-only matmul for decode, a dequantized matmul for prefill."""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

import torch

from npuflow.backends.common import (
    library_versions,
    linear_w4a16_reference,
    linear_w8a16_reference,
    prepare_with_inductor,
)

NAME = "cpu"
RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")  # package energy counter, microjoules


def unavailable() -> str | None:
    return None


def device() -> torch.device:
    return torch.device("cpu")


def device_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def default_dtype() -> torch.dtype:
    """bf16 where the CPU computes it natively (AVX512-BF16 or AMX: oneDNN says so), else float32:
    emulated bf16 is slower than float32, and the int8 decode kernel wants bf16 activations."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def linear_w8a16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Decode-sized inputs (<= 4 rows) in bf16 use aten's int8 kernel; everything else dequantizes."""
    rows = x.numel() // x.shape[-1]
    if x.dtype == torch.bfloat16 and rows <= 4:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, x.shape[-1]), qweight, scale.to(x.dtype))
        return y.reshape(*x.shape[:-1], qweight.shape[0])
    return linear_w8a16_reference(x, qweight, scale)


# int4 weights: a dequantized matmul (the packed int4 kernel is the backends issue's work);
# HF modules as they are (SDPA attention), graph mode compiled with inductor
linear_w4a16 = linear_w4a16_reference
prepare = prepare_with_inductor


def kernels(dtype: torch.dtype) -> dict[str, str]:
    if dtype == torch.bfloat16:
        return {"linear_w8a16": "aten._weight_int8pack_mm (decode) / dequantized F.linear (prefill)", "linear_w4a16": "dequantized F.linear", "attention": "sdpa"}
    return {"linear_w8a16": "dequantized F.linear", "linear_w4a16": "dequantized F.linear", "attention": "sdpa"}


def synchronize() -> None:
    pass


def now_ms() -> float:
    return time.perf_counter() * 1e3


def reset_peak_memory() -> None:
    pass


def peak_memory_mb() -> float:
    """Peak resident set size of this process (the whole serving process on a CPU)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def energy_joules() -> float | None:
    try:
        return int(RAPL.read_text()) / 1e6
    except (OSError, ValueError):
        return None


def energy_unavailable() -> str:
    return f"not measured: RAPL counter {RAPL} is not readable on this machine"


def versions() -> dict[str, str]:
    return library_versions()
