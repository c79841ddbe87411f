"""Quantized checkpoint formats: one writer and one reader per format, the same interface for each.

A writer takes the quantize stage's output shard by shard, so a format never needs the whole model:
    writer = make_writer(fmt, out_dir, scheme, hf_config)
    writer.add_shard("model-00001-of-00002.safetensors", {name: Tensor | QuantizedWeight, ...})
    ...
    files = writer.finish()   # index / description / config changes; returns the weight files written
A reader gives back what the runtime loads: read_quantized(dir, fmt) -> {name: Tensor | QuantizedWeight}.
Non-weight files (config.json, tokenizer, generation config) are copied into out_dir before finish(),
so a format that edits config.json (compressed-tensors) does it in finish().
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass
class QuantizedWeight:
    """An integer weight with its dequantization parameters (unpacked: one integer per element).

    bits 8, symmetric, per channel:  qweight int8 (out, in) in [-127, 127]; scale (out,); zero None
        w ~= qweight * scale[:, None]
    bits 4, asymmetric, per group g: qweight uint8 (out, in) in [0, 15]; scale, zero (out, in // g)
        w ~= (qweight - zero) * scale, each scale/zero column covering g consecutive input channels
    scale and zero are float32 (zero holds integers).

    W8A8 (bits 8, per channel) also quantizes the linear's input at run time (`act`):
        "token":  dynamic, one symmetric scale per token (row of x): x_q = round(x / (amax|x_row| / 127))
        "tensor": static, x_q = clamp(round(x / act_scale + act_offset), -128, 127) with act_scale,
                  act_offset float32 (1,) from calibration (act_offset holds an integer)
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int | None  # None: one scale per output channel
    act: str | None = None  # None: weight-only; "token" | "tensor": int8 activations as above
    act_scale: torch.Tensor | None = None  # (1,) float32, act "tensor" only
    act_offset: torch.Tensor | None = None  # (1,) float32 integer in [-128, 127], act "tensor" only

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in)."""
        q = self.qweight.float()
        if self.group_size is None:
            zero = self.zero[:, None] if self.zero is not None else 0.0
            return (q - zero) * self.scale.float()[:, None]
        scale = self.scale.float().repeat_interleave(self.group_size, dim=1)  # (out, in)
        zero = self.zero.float().repeat_interleave(self.group_size, dim=1) if self.zero is not None else 0.0
        return (q - zero) * scale


Shard = dict[str, "torch.Tensor | QuantizedWeight"]

# layers the serving engines (vLLM, vllm-ascend) load fused from HF's separate projections
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fused_mismatches(types: dict[str, str]) -> list[str]:
    """Fused layers whose HF parts differ in type (tensor name -> a type label); the engines refuse those."""
    bad = []
    for name in types:
        for fused, parts in FUSED.items():
            if not name.endswith(f".{parts[0]}.weight"):
                continue
            stem = name.removesuffix(f"{parts[0]}.weight")
            found = {p: types.get(f"{stem}{p}.weight") for p in parts}
            if len(set(found.values())) > 1:
                bad.append(f"{stem}{fused} ({', '.join(f'{p}: {t}' for p, t in found.items())})")
    return bad


class Writer(Protocol):
    def add_shard(self, shard: str, tensors: Shard) -> None: ...
    def finish(self) -> list[str]: ...


# format -> "module:Writer"; each module also has read(dir) -> {name: Tensor | QuantizedWeight}
FORMATS = {
    "native": "npuflow.formats.native",
    "msmodelslim": "npuflow.formats.msmodelslim",
    "compressed-tensors": "npuflow.formats.compressed_tensors",
}


def _module(fmt: str):
    import importlib

    from npuflow.core.errors import ConfigError

    try:
        return importlib.import_module(FORMATS[fmt])
    except KeyError:
        raise ConfigError(f"invalid format {fmt!r}; valid: {', '.join(FORMATS)}") from None


def make_writer(fmt: str, out_dir: Path, scheme: str, hf_config: dict) -> Writer:
    return _module(fmt).Writer(out_dir, scheme, hf_config)


def read_tensors(model_dir: Path, mapped: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in model_dir, by name (the formats' readers start here).

    mapped: views of safe_open's file mapping (pages read when touched; right when the tensors go on to a
    device or are read once); False: read into this process's own memory (formats/files.py: for weights
    that stay in host memory, so the ones replaced after loading are really freed)."""
    raw: dict[str, torch.Tensor] = {}
    if not mapped:
        from npuflow.formats.files import read_header, read_slice

        for path in sorted(model_dir.glob("*.safetensors")):
            with open(path, "rb", buffering=0) as f:
                header, base = read_header(f)
                for name, info in header.items():
                    raw[name] = read_slice(f, info, base, None, (0, 0))
        return raw
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                raw[name] = f.get_tensor(name)
    return raw


def read_quantized(model_dir: Path, fmt: str, mapped: bool = True) -> Shard:
    """Every tensor of a quantized checkpoint, integer weights as QuantizedWeight (unpacked); `mapped` as
    read_tensors."""
    return _module(fmt).read(model_dir, mapped)
