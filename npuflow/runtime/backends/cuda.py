"""CUDA backend: aten int8 weight-only matmul, CUDA events, NVML energy."""

from __future__ import annotations

import torch

from npuflow.runtime.backends.common import (
    library_versions,
    linear_w4a16_reference,
    linear_w8a8_reference,
    prepare_with_inductor,
)

NAME = "cuda"


def unavailable() -> str | None:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU build; install a CUDA build of torch==2.13.0"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU or driver"
    return None


def device() -> torch.device:
    return torch.device("cuda")


def device_name() -> str:
    return torch.cuda.get_device_name()


def default_dtype() -> torch.dtype:
    return torch.bfloat16


def linear_w8a16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, x.shape[-1]), qweight, scale.to(x.dtype))
    return y.reshape(*x.shape[:-1], qweight.shape[0])


# int4 weights: a dequantized matmul (the packed int4 kernel is the backends issue's work);
# HF modules as they are (SDPA attention), graph mode compiled with inductor
linear_w4a16 = linear_w4a16_reference
linear_w8a8 = linear_w8a8_reference  # activations quantized as the CPU does; the product in float64 (not fast)
prepare = prepare_with_inductor


def kernels(dtype: torch.dtype) -> dict[str, str]:
    return {"linear_w8a16": "aten._weight_int8pack_mm", "linear_w4a16": "dequantized F.linear",
            "linear_w8a8": "reference (int8 activations, float64 product)", "attention": "sdpa"}


def synchronize() -> None:
    torch.cuda.synchronize()


def now_ms() -> float:
    import time

    torch.cuda.synchronize()
    return time.perf_counter() * 1e3


def reset_peak_memory() -> None:
    torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20


def energy_joules() -> float | None:
    """NVML's total energy counter (Volta and newer), joules; None when NVML is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3
    except Exception:
        return None


def energy_unavailable() -> str:
    return "not measured: NVML (pynvml) is not installed or the GPU has no energy counter"


def versions() -> dict[str, str]:
    return {**library_versions(), "cuda": str(torch.version.cuda)}
