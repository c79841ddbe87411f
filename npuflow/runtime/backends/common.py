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
