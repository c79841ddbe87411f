"""npuflow's native format: safetensors shards laid out like the source + quant_manifest.json.

Per quantized linear `X.weight`:
  8-bit: X.weight int8 (out, in); X.weight_scale float32 (out,)
  4-bit: X.weight uint8 (out, in // 2), two values per byte (even input channel in the low nibble);
         X.weight_scale, X.weight_zero_point float32 (out, in // group_size)
  w8a8 (static): also X.input_scale, X.input_offset float32 (1,); w8a8-dynamic: nothing more (the manifest's
         scheme says the inputs are quantized per token)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from npuflow.formats import QuantizedWeight, Shard, read_tensors

INDEX = "model.safetensors.index.json"
SCALE, ZERO = "weight_scale", "weight_zero_point"
ACT = {"w8a8": "tensor", "w8a8-dynamic": "token"}  # scheme -> how the quantized linears' inputs are quantized


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values in [0, 15] -> (out, in // 2) uint8; column 2j in the low nibble, 2j+1 high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in // 2) uint8 -> (out, in) uint8 in [0, 15]."""
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


class Writer:
    """Shards keep the source's file names; an index is written when there is more than one."""

    def __init__(self, out_dir: Path, scheme: str, hf_config: dict):
        self.out_dir, self.scheme = out_dir, scheme
        self.weight_map: dict[str, str] = {}

    def add_shard(self, shard: str, tensors: Shard) -> None:
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if isinstance(t, QuantizedWeight):
                prefix = name.removesuffix("weight")
                out[name] = pack_int4(t.qweight) if t.bits == 4 else t.qweight.to(torch.int8)
                out[prefix + SCALE] = t.scale.float().contiguous()
                if t.zero is not None:
                    out[prefix + ZERO] = t.zero.float().contiguous()
                if t.act == "tensor":
                    out[prefix + "input_scale"], out[prefix + "input_offset"] = t.act_scale, t.act_offset
            else:
                out[name] = t.contiguous()
        save_file(out, self.out_dir / shard, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(out, shard))

    def finish(self) -> list[str]:
        files = sorted(set(self.weight_map.values()))
        if len(files) > 1:
            total = sum((self.out_dir / f).stat().st_size for f in files)  # bytes, as HF writes it
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.out_dir / INDEX).write_text(json.dumps(index, indent=2))
        return files


def read(model_dir: Path, mapped: bool = True) -> Shard:
    """Tensors by name; the quant manifest says which are integer weights (never the file names)."""
    manifest = json.loads((model_dir / "quant_manifest.json").read_text())
    tensors = manifest["tensors"]
    act = ACT.get(manifest.get("scheme"))
    quantized = {k: v for k, v in tensors.items() if v["quantized"]}
    raw = read_tensors(model_dir, mapped)
    out: Shard = {}
    for name, meta in quantized.items():
        prefix = name.removesuffix("weight")
        q = raw.pop(name)
        out[name] = QuantizedWeight(
            qweight=unpack_int4(q) if meta["bits"] == 4 else q, scale=raw.pop(prefix + SCALE),
            zero=raw.pop(prefix + ZERO, None), bits=meta["bits"], group_size=meta["group_size"],
            act=act, act_scale=raw.pop(prefix + "input_scale", None), act_offset=raw.pop(prefix + "input_offset", None),
        )
    out.update(raw)
    return out
