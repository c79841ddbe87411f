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


SCHEMES = {"w8a16": W8A16, "w4a16": W4A16}


def get_handler(cfg: QuantizationConfig) -> W8A16 | W4A16:
    if cfg.scheme not in SCHEMES:
        raise ConfigError(f"invalid quantization scheme {cfg.scheme!r}; valid: {', '.join(SCHEMES)}")
    return W4A16(group_size=cfg.group_size or 128) if cfg.scheme == "w4a16" else W8A16()
