"""One handler per scheme with the same methods (check, quantize); get_handler dispatches on the config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from npuflow.core.config import QuantizationConfig
from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.formats import QuantizedWeight
from npuflow.quant.primitives import quantize_group_asym, quantize_per_channel_int8


@dataclass(frozen=True)
class W8A16:
    """int8 weights, symmetric, one scale per output channel; activations stay 16-bit (float on CPU)."""

    group_size: int | None = None
    bits: int = 8

    def check(self, name: str, w: torch.Tensor) -> None:
        pass

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        q, scale = quantize_per_channel_int8(w)
        return QuantizedWeight(q, scale, None, 8, None)


@dataclass(frozen=True)
class W4A16:
    """int4 weights, asymmetric, one scale and zero point per group of input channels."""

    group_size: int = 128
    bits: int = 4

    def check(self, name: str, w: torch.Tensor) -> None:
        if w.shape[1] % self.group_size:
            raise NpuflowError(
                f"group size {self.group_size} does not divide the input dimension {w.shape[1]} of {name}; "
                "choose a group size that divides every layer's input width (32, 64 or 128 for Llama)"
            )

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        return quantize_group_asym(w, self.bits, self.group_size)


@dataclass(frozen=True)
class W8A8:
    """int8 weights, symmetric per output channel, and int8 inputs: per token at run time (`dynamic`) or one
    calibrated scale + offset per linear (static). The calibration (quant/smoothquant.py) supplies the static
    activation parameters and smooths the weights first; `quantize` alone gives the weight part."""

    dynamic: bool = False
    group_size: int | None = None
    bits: int = 8

    @property
    def act(self) -> str:
        return "token" if self.dynamic else "tensor"

    def check(self, name: str, w: torch.Tensor) -> None:
        pass

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        q, scale = quantize_per_channel_int8(w)
        return QuantizedWeight(q, scale, None, 8, None, act=self.act)


SCHEMES = {"w8a16": W8A16, "w4a16": W4A16, "w8a8": W8A8, "w8a8-dynamic": W8A8}
HEAD = "lm_head.weight"


def for_tensor(handler, name: str):
    """The handler of one weight: an lm_head that is quantized is int8 per output channel whatever the scheme
    (as llama.cpp keeps its output matrix at 6+ bits in a 4-bit model). On the demo model, W4A16 g128 RTN:
    top-1 agreement 0.968 with a 4-bit lm_head against 0.993 float; an 8-bit one costs W8A16 0.0007
    (benchmarks/quantization_quality.py)."""
    return W8A16() if name == HEAD and isinstance(handler, W4A16) else handler


def get_handler(cfg: QuantizationConfig) -> W8A16 | W4A16 | W8A8:
    if cfg.scheme not in SCHEMES:
        raise ConfigError(f"invalid quantization scheme {cfg.scheme!r}; valid: {', '.join(SCHEMES)}")
    if cfg.scheme.startswith("w8a8"):
        return W8A8(dynamic=cfg.scheme == "w8a8-dynamic")
    return W4A16(group_size=cfg.group_size or 128) if cfg.scheme == "w4a16" else W8A16()
