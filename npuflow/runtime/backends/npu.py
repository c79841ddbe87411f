"""Ascend NPU backend (torch_npu 2.13.0, CANN 8.x): weight-quant batch matmul, NPU events, npu-smi."""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch

from npuflow.runtime.backends.common import library_versions
from npuflow.runtime.backends.power import PowerSampler, npu_smi_reader

NAME = "npu"
INSTALL_HINT = "install CANN 8.x, source its set_env.sh, then `pip install 'npuflow[npu]'` (torch_npu==2.13.0)"


def unavailable() -> str | None:
    if importlib.util.find_spec("torch_npu") is None:
        return f"torch_npu is not installed; {INSTALL_HINT}"
    try:
        import torch_npu  # noqa: F401
    except (ImportError, OSError) as err:  # e.g. libhccl.so missing: CANN absent or not sourced
        return f"torch_npu not importable: {err}; {INSTALL_HINT}"
    if not torch.npu.is_available():  # type: ignore[attr-defined]
        return "torch_npu imports but finds no NPU (check `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES)"
    return None


def device() -> torch.device:
    return torch.device("npu")


def device_name() -> str:
    return torch.npu.get_device_name()  # type: ignore[attr-defined]


def default_dtype() -> torch.dtype:
    """bf16 on Atlas A2/A3 (910B/910C); fp16 on inference cards (310P) that lack bf16 matmul."""
    name = device_name()
    return torch.float16 if "310" in name else torch.bfloat16


def linear_w8a16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch_npu.npu_weight_quant_batchmatmul: x (M, K), weight (K, N) int8, antiquant_scale (N,)."""
    import torch_npu

    rows = x.numel() // x.shape[-1]
    y = torch_npu.npu_weight_quant_batchmatmul(
        x.reshape(rows, x.shape[-1]), qweight.t(), antiquant_scale=scale.to(x.dtype)
    )
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def linear_w4a16(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """torch_npu.npu_weight_quant_batchmatmul per group: weight (K, N), antiquant_scale/offset (K/g, N);
    the op computes x @ ((weight + offset) * scale), so offset = -zero."""
    import torch_npu

    rows = x.numel() // x.shape[-1]
    y = torch_npu.npu_weight_quant_batchmatmul(
        x.reshape(rows, x.shape[-1]), qweight.t().to(torch.int8), antiquant_scale=scale.t().to(x.dtype),
        antiquant_offset=(-zero).t().to(x.dtype), antiquant_group_size=group_size,
    )
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor | None = None,
                input_offset: torch.Tensor | None = None, wsum: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 as vllm-ascend runs it: per token, npu_dynamic_quant + npu_quant_matmul(pertoken_scale) (w8a8_dynamic.py);
    static, npu_quantize(x * 1/input_scale + input_offset) + npu_quant_matmul with deq_scale = input_scale *
    scale and the int32 bias -input_offset * wsum (w8a8_static.py; fp16 needs the int64 deq_scale)."""
    import torch_npu

    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, x.shape[-1])
    if input_scale is None:
        xq, xs = torch_npu.npu_dynamic_quant(x2)
        y = torch_npu.npu_quant_matmul(xq, qweight.t(), scale.float(), pertoken_scale=xs, output_dtype=x.dtype)
    else:
        xq = torch_npu.npu_quantize(x2, 1.0 / input_scale.float(), input_offset.float(), torch.qint8, -1, False)
        deq = (input_scale.float() * scale.float()).contiguous()  # (out,)
        if x.dtype == torch.float16:
            deq = torch_npu.npu_trans_quant_param(deq)
        if wsum is None:
            wsum = qweight.sum(dim=1, dtype=torch.int32)
        bias = (-input_offset.to(torch.int32) * wsum).to(torch.int32)  # (out,) exact: offset is an integer
        y = torch_npu.npu_quant_matmul(xq, qweight.t(), deq, bias=bias, output_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def prepare(model: torch.nn.Module, graph: bool = False) -> torch.nn.Module:
    """Swap the Llama blocks onto torch_npu's fused kernels (norms, rotary, attention, SwiGLU).

    Eager uses npu_fusion_attention / npu_incre_flash_attention; graph mode needs the inference op
    npu_fused_infer_attention_score (the fusion op is eager-only) and torchair's backend.
    """
    import torch_npu

    from npuflow.runtime.backends.npu_model import apply_fused_ops

    apply_fused_ops(model, torch_npu, attention="fused_infer" if graph else "fusion")
    if graph:
        import torchair

        model.forward = torch.compile(model.forward, dynamic=True, backend=torchair.get_npu_backend())
    return model


def kernels(dtype: torch.dtype) -> dict[str, str]:
    return {"linear_w8a16": "torch_npu.npu_weight_quant_batchmatmul",
            "linear_w4a16": "torch_npu.npu_weight_quant_batchmatmul (per group, int8-held int4)",
            "linear_w8a8": "torch_npu.npu_quant_matmul (+ npu_dynamic_quant per token / npu_quantize static)",
            "rms_norm": "torch_npu.npu_rms_norm / npu_add_rms_norm", "rotary": "torch_npu.npu_rotary_mul",
            "attention": "torch_npu.npu_fusion_attention (prefill) / npu_incre_flash_attention (decode)",
            "swiglu": "torch_npu.npu_swiglu"}


def synchronize() -> None:
    torch.npu.synchronize()  # type: ignore[attr-defined]


def now_ms() -> float:
    import time

    synchronize()
    return time.perf_counter() * 1e3


def reset_peak_memory() -> None:
    torch.npu.reset_peak_memory_stats()  # type: ignore[attr-defined]


def peak_memory_mb() -> float:
    return torch.npu.max_memory_allocated() / 2**20  # type: ignore[attr-defined]


_sampler: PowerSampler | None = None


def smi_id() -> tuple[int, int]:
    """(card, chip) as npu-smi numbers them for this process's device. Default: device index N is card N,
    chip 0 (one chip per card, as on 910B boards); NPUFLOW_NPU_SMI_ID=CARD:CHIP where that does not hold."""
    pinned = os.environ.get("NPUFLOW_NPU_SMI_ID")
    if pinned:
        card, _, chip = pinned.partition(":")
        return int(card), int(chip or 0)
    return int(torch.npu.current_device()), 0  # type: ignore[attr-defined]


def energy_joules() -> float | None:
    """Joules since the first call, integrated from `npu-smi info -t power` sampled every 100 ms on a
    thread; None when npu-smi is absent or prints no power (then energy is reported as not measured)."""
    global _sampler
    if _sampler is None:
        exe = shutil.which("npu-smi")
        if exe is None:
            return None
        _sampler = PowerSampler(npu_smi_reader(*smi_id(), exe=exe)).start()
    return _sampler.joules()


def energy_unavailable() -> str:
    if shutil.which("npu-smi") is None:
        return "not measured: npu-smi is not on PATH (it ships with the Ascend driver)"
    card, chip = smi_id()
    return (f"not measured: `npu-smi info -t power -i {card} -c {chip}` printed no power reading; "
            "set NPUFLOW_NPU_SMI_ID=CARD:CHIP to the chip this process runs on")


def versions() -> dict[str, str]:
    out = library_versions("torch_npu")
    cann = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
    if cann:
        out["cann_home"] = cann
    return out
