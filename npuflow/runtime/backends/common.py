"""Pieces the device backends share: library versions and the reference W8A16 matmul."""

from __future__ import annotations

import importlib.metadata

import torch


def library_versions(*extra: str) -> dict[str, str]:
    out = {"torch": torch.__version__}
    for dist in ("transformers", "safetensors", "npuflow", *extra):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def linear_w8a16_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x @ (qweight * scale[:, None]).T; x (..., in), qweight int8 (out, in), scale (out,)."""
    return torch.nn.functional.linear(x, qweight.to(x.dtype) * scale.to(x.dtype)[:, None])


def linear_w4a16_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """y = x @ ((qweight - zero) * scale).T with scale, zero (out, in // group_size) over groups of inputs."""
    s = scale.to(x.dtype).repeat_interleave(group_size, dim=1)  # (out, in)
    z = zero.to(x.dtype).repeat_interleave(group_size, dim=1)
    return torch.nn.functional.linear(x, (qweight.to(x.dtype) - z) * s)


def prepare_with_inductor(model: torch.nn.Module, graph: bool = False) -> torch.nn.Module:
    """HF modules as they are (SDPA attention); graph mode compiles the forward with inductor."""
    if graph:
        model.forward = torch.compile(model.forward, dynamic=True)
    return model


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of x (rows, in): x ~= x_q (rows, in) int8 * scale (rows, 1) float32."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) / 127.0  # (rows, 1)
    return (x.float() / scale).round_().clamp_(-127, 127).to(torch.int8), scale


def quantize_static_int8(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x_q = clamp(round(x / scale + offset), -128, 127) int8, the shape of x; scale, offset (1,)."""
    return (x.float() / scale.float() + offset.float()).round_().clamp_(-128, 127).to(torch.int8)


def linear_w8a8_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                          input_scale: torch.Tensor | None = None, input_offset: torch.Tensor | None = None,
                          wsum: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: x (..., in) quantized to int8 (per token when input_scale is None, else static per tensor),
    times qweight int8 (out, in), dequantized with scale (out,): y = (x_q - offset) @ q.T * s_x * s_w.
    The integer products are summed in float64 (exact, as an int32 GEMM). wsum is unused (the fast path's)."""
    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, x.shape[-1])
    if input_scale is None:
        xq, xs = quantize_per_token_int8(x2)
        xi = xq.double()
    else:
        xi, xs = quantize_static_int8(x2, input_scale, input_offset).double() - input_offset.double(), input_scale
    acc = xi @ qweight.double().T  # (rows, out), integers
    y = acc * xs.double() * scale.double()[None, :]
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])
