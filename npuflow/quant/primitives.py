"""Quantization primitives: pure tensor functions (int8 per channel, int4/8 per group, asymmetric)."""

from __future__ import annotations

import torch

from npuflow.core.errors import NpuflowError
from npuflow.formats import QuantizedWeight


def quantize_per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per output row: w (out, in) ~= q (out, in) * scale (out,)[:, None].

    Works through ~4 MB blocks of rows so the float32 temporaries stay in cache (2.5x faster than
    whole-tensor passes on 2 cores). A NaN/Inf anywhere in a row gives a non-finite scale.
    """
    lo, hi = torch.aminmax(w, dim=1)  # exact in the source dtype
    scale = torch.maximum(hi.float(), lo.float().neg()).clamp(min=1e-12) / 127.0  # (out,) fp32
    q = torch.empty(w.shape, dtype=torch.int8)
    rows = max(1, (1 << 20) // max(1, w.shape[1]))  # 1M fp32 elements per block
    for r in range(0, w.shape[0], rows):
        block = w[r : r + rows].to(torch.float32, copy=True)  # never modify the caller's tensor
        q[r : r + rows] = block.div_(scale[r : r + rows, None]).round_().clamp_(-127, 127)
    return q, scale


def dequantize_per_channel_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def group_params_asym(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max parameters per group: scale, zero (out, in // group_size), float32."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)  # (out, groups, g)
    lo = g.amin(dim=-1).clamp(max=0.0)  # the range always contains 0, so 0 is exact
    hi = g.amax(dim=-1).clamp(min=0.0)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def quantize_with_params(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(w / s) + z, 0, 2^bits - 1) with per-group s, z (out, in // g) -> uint8 (out, in)."""
    group = w.shape[1] // scale.shape[1]
    s = scale.repeat_interleave(group, dim=1)
    z = zero.repeat_interleave(group, dim=1)
    return (torch.round(w.float() / s) + z).clamp_(0, 2**bits - 1).to(torch.uint8)


def quantize_group_asym(w: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Round-to-nearest asymmetric group quantization of w (out, in)."""
    if w.shape[1] % group_size:
        raise NpuflowError(f"group size {group_size} does not divide the input dimension {w.shape[1]}")
    scale, zero = group_params_asym(w, bits, group_size)
    return QuantizedWeight(quantize_with_params(w, scale, zero, bits), scale, zero, bits, group_size)


def activation_params_static(lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-tensor int8 parameters for inputs seen in [lo, hi]: scale, offset float32 (1,) with
    x_q = clamp(round(x / scale + offset), -128, 127) (msModelSlim's input_scale / input_offset convention)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # the range always contains 0, so 0 is exact
    scale = max(hi - lo, 1e-8) / 255.0
    offset = min(127.0, max(-128.0, round(-128.0 - lo / scale)))
    return torch.tensor([scale], dtype=torch.float32), torch.tensor([offset], dtype=torch.float32)

