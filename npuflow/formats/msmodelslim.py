"""msmodelslim format: the layout vllm-ascend (`--quantization ascend`) and MindIE load on Ascend NPUs.

Per quantized linear `X` (HF module names; vllm-ascend AscendW8A16LinearMethod):
  X.weight         int8    (out, in)  q in [-127, 127]
  X.weight_scale   float32 (out, 1)   w ~= q * scale
  X.weight_offset  float32 (out, 1)   all zeros: npuflow's int8 is symmetric
W8A8 (static, vllm-ascend AscendW8A8LinearMethod in methods/w8a8_static.py; msModelSlim on_w8a8_static):
  X.weight         int8    (out, in)
  X.input_scale    float32 (1,)       x_q = clamp(round(x / input_scale + input_offset), -128, 127)
  X.input_offset   float32 (1,)       (an integer; vllm-ascend loads it into an int8 parameter)
  X.quant_bias     int32   (out,)     round(bias / deq_scale - input_offset * sum_in(weight)), bias 0 if none
  X.deq_scale      (out,)             input_scale * weight_scale: float32 for bf16 models, else int64 holding
                                      the float32 bit pattern (msModelSlim deqscale2int64_by_dtype; vllm-ascend
                                      get_perchannel_param: float32 for bf16, int64 for fp16)
  X.weight_scale   float32 (out, 1)   the parameters vllm-ascend also creates (get_perchannel_param); msModelSlim's
  X.weight_offset  float32 (out, 1)   V1 saver leaves them out for W8A8, npuflow writes them (zeros offset)
  npu_quant_matmul(x_q, weight.T, deq_scale, bias=quant_bias) = (x_q @ W.T + quant_bias) * deq_scale
W8A8_DYNAMIC (methods/w8a8_dynamic.py AscendW8A8DynamicLinearMethod; msModelSlim on_w8a8_dynamic_per_channel):
  X.weight int8 (out, in), X.weight_scale float32 (out, 1), X.weight_offset float32 (out, 1) zeros; the inputs
  are quantized per token at run time (npu_dynamic_quant)
Everything else (norms, smoothed by SmoothQuant in W8A8, embeddings, lm_head when ignored) keeps its name and
float dtype.

quant_model_description.json: {"model_quant_type": "W8A16", "version": "1.0.0", "group_size": 0,
  <every tensor name>: "W8A16" | "FLOAT"}; it alone says which tensors are integer (never the file names).
Weights: quant_model_weight_<type lower-cased>.safetensors (w8a16, w8a8, w8a8_dynamic), or, for a sharded source, quant_model_weight_w8a16-0000i-of-0000N
.safetensors + quant_model_weight_w8a16.safetensors.index.json (vLLM loads every *.safetensors in the folder).

Sources read (vllm-project/vllm-ascend @ 182b75e, Ascend/msmodelslim @ 3de0a3c):
  vllm_ascend/quantization/methods/w8a16.py  AscendW8A16LinearMethod.get_weight / get_perchannel_param /
      apply (torch_npu.npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset)) /
      process_weights_after_loading (weight transposed to (in, out), scale and offset flattened to (out,))
  vllm_ascend/quantization/method_adapters.py  AscendLinearMethod.create_weights: the parameters above, with
      output_dim=0, so a fused qkv_proj / gate_up_proj loads each HF shard into its slice of the output rows
  vllm_ascend/quantization/modelslim_config.py  quant_model_description.json; get_linear_quant_type and
      is_layer_skipped_ascend look up `<prefix>.weight` per HF shard of a fused layer and raise unless all
      shards share one type; create_scheme_for_layer finds the scheme in methods/registry.py, where W4A16 is
      registered for MoE experts only (methods/w4a16.py), so a dense W4A16 Llama does not load
  msmodelslim/core/quant_service/modelslim_v1/save/ascendv1.py  AscendV1Saver.on_w8a16_static_per_channel
      (float32 (out, 1) scale and offset) and post_run (version, model_quant_type, group_size keys)
  vllm_ascend/quantization/methods/w8a8_static.py AscendW8A8LinearMethod (get_weight, get_pertensor_param,
      get_perchannel_param, apply: npu_quant_matmul with deq_scale and quant_bias) and w8a8_dynamic.py
      AscendW8A8DynamicLinearMethod (get_weight, get_perchannel_param, npu_dynamic_quant + npu_quant_matmul)
  Ascend/msmodelslim @ 030d6ea: core/quant_service/modelslim_v1/save/ascendv1.py on_w8a8_static (quant_bias,
      deq_scale, input_scale/offset float32) and on_w8a8_dynamic_per_channel; save/utils/deqscale.py
  msmodelslim/pytorch/llm_ptq/llm_ptq_tools/save/saver/ascend_v1.py (file name quant_model_weight_<type>)
      and save/writer/buffered_safetensor.py (shard names and index)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.formats import QuantizedWeight, Shard, fused_mismatches, read_tensors

DESCRIPTION = "quant_model_description.json"
VERSION = "1.0.0"  # the description version msmodelslim's AscendV1Saver writes
FLOAT = "FLOAT"
# npuflow scheme -> msmodelslim quant type that vllm-ascend runs on dense linears (methods/registry.py)
QUANT_TYPES = {"w8a16": "W8A16", "w8a8": "W8A8", "w8a8-dynamic": "W8A8_DYNAMIC"}
# vLLM's LlamaForCausalLM.packed_modules_mapping: HF shards that vllm-ascend loads as one fused layer
EMBED = "model.embed_tokens.weight"


class Writer:
    """Streams shards to quant_model_weight_<scheme>* files; finish() names them and writes the description."""

    def __init__(self, out_dir: Path, scheme: str, hf_config: dict):
        if scheme not in QUANT_TYPES:
            raise ConfigError(
                f"format msmodelslim does not support scheme {scheme!r}; supported: "
                f"{', '.join(f'{s} ({t}, int8 per output channel)' for s, t in QUANT_TYPES.items())}. vllm-ascend "
                "registers W4A16 for MoE experts only (vllm_ascend/quantization/methods/w4a16.py), so a dense "
                "Llama cannot run it on Ascend; use scheme w8a16, or format compressed-tensors / native for w4a16"
            )
        self.out_dir, self.scheme, self.quant_type = out_dir, scheme, QUANT_TYPES[scheme]
        self.stem = f"quant_model_weight_{self.quant_type.lower()}"
        self.bf16 = (hf_config.get("torch_dtype") or hf_config.get("dtype")) == "bfloat16"  # deq_scale's dtype
        self.types: dict[str, str] = {}  # tensor name -> "W8A16" | "FLOAT"
        self.parts: list[tuple[str, list[str], int]] = []  # (provisional file, tensor names, bytes of tensors)

    def add_shard(self, shard: str, tensors: Shard) -> None:
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(t, QuantizedWeight):
                out[name] = t.contiguous()
                self.types[name] = FLOAT
                continue
            if name == EMBED:
                raise ConfigError(
                    f"format msmodelslim cannot hold a quantized {name}: vllm-ascend runs a quantized embedding "
                    "through AscendEmbeddingMethod, which has no embedding lookup; keep model.embed_tokens in "
                    "quantization.ignore"
                )
            if t.act is not None:
                w8a8 = w8a8_tensors(t, tensors.get(name.removesuffix("weight") + "bias"), self.bf16)
                out |= {name.removesuffix("weight") + k: v for k, v in w8a8.items()}
                self.types.update(dict.fromkeys((name.removesuffix("weight") + k for k in w8a8), self.quant_type))
                continue
            if t.bits != 8 or t.group_size is not None or t.zero is not None:
                # a non-zero offset is ambiguous: msmodelslim dequantizes (q - offset) * scale and MindIE negates
                # the offset on load, but vllm-ascend's w8a16.py passes it to the NPU kernel as (q + offset)
                raise NpuflowError(
                    f"{name}: format msmodelslim writes symmetric per-channel int8 only, got {t.bits}-bit "
                    f"group_size={t.group_size} {'asymmetric' if t.zero is not None else 'symmetric'}"
                )
            prefix = name.removesuffix("weight")
            scale = t.scale.float().reshape(-1, 1).contiguous()  # (out, 1)
            out[name] = t.qweight.to(torch.int8).contiguous()  # (out, in)
            out[prefix + "weight_scale"] = scale
            out[prefix + "weight_offset"] = torch.zeros_like(scale)  # (out, 1)
            self.types.update(dict.fromkeys((name, prefix + "weight_scale", prefix + "weight_offset"), self.quant_type))
        # provisional name: the shard count is known only in finish(), as in msmodelslim's BufferedSafetensorsWriter
        part = f"{self.stem}-{len(self.parts) + 1:05d}-of-00000.safetensors"
        save_file(out, self.out_dir / part, metadata={"format": "pt"})
        self.parts.append((part, list(out), sum(v.numel() * v.element_size() for v in out.values())))

    def finish(self) -> list[str]:
        bad = fused_mismatches(self.types)
        if bad:
            raise ConfigError(
                "vllm-ascend loads q/k/v_proj and gate/up_proj as fused layers whose shards must share one type "
                f"(modelslim_config.py get_linear_quant_type); mixed: {'; '.join(bad)}. Ignore all of a fused "
                "group or none of it"
            )
        n, stem = len(self.parts), self.stem
        names = [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for (part, _, _), name in zip(self.parts, names, strict=True):
            (self.out_dir / part).rename(self.out_dir / name)
        if n > 1:
            weight_map = {t: name for (_, tensors, _), name in zip(self.parts, names, strict=True) for t in tensors}
            index = {"metadata": {"total_size": sum(size for _, _, size in self.parts)},  # bytes of tensor data
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        header = {"model_quant_type": self.quant_type, "version": VERSION, "group_size": 0}  # 0: per channel
        description = header | dict(sorted(self.types.items()))
        (self.out_dir / DESCRIPTION).write_text(json.dumps(description, indent=2))
        return names


def deq_scale_bits(deq: torch.Tensor) -> torch.Tensor:
    """float32 (out,) -> int64 (out,) holding its float32 bit pattern (msModelSlim deqscale2int64)."""
    return deq.float().contiguous().view(torch.int32).to(torch.int64)


def deq_scale_float(deq: torch.Tensor) -> torch.Tensor:
    """deq_scale as written (float32, or int64 bits) -> float32 (out,)."""
    return deq.to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq.float()


def w8a8_tensors(t: QuantizedWeight, bias: torch.Tensor | None, bf16: bool) -> dict[str, torch.Tensor]:
    """One W8A8 / W8A8_DYNAMIC linear's tensors (local names) as vllm-ascend creates its parameters."""
    if t.bits != 8 or t.group_size is not None or t.zero is not None:
        raise NpuflowError(f"W8A8 weights are symmetric int8 per channel, got {t.bits}-bit group {t.group_size}")
    scale = t.scale.float().reshape(-1, 1).contiguous()  # (out, 1)
    out = {"weight": t.qweight.to(torch.int8).contiguous(), "weight_scale": scale,
           "weight_offset": torch.zeros_like(scale)}
    if t.act == "tensor":
        if t.act_scale is None:
            raise NpuflowError("static W8A8 needs calibrated activation parameters (quantize through quantize_model)")
        deq = (t.act_scale.float() * scale[:, 0]).contiguous()  # (out,) float32
        b = torch.zeros(deq.shape) if bias is None else bias.float()
        correction = t.qweight.to(torch.float32).sum(dim=1) * t.act_offset.float()  # (out,)
        out |= {"input_scale": t.act_scale.float().reshape(1), "input_offset": t.act_offset.float().reshape(1),
                "quant_bias": torch.round(b / deq - correction).to(torch.int32),
                "deq_scale": deq if bf16 else deq_scale_bits(deq)}
    return out


def read(model_dir: Path, mapped: bool = True) -> Shard:
    """Tensors by HF name; quant_model_description.json says which are W8A16 (the file names never do).

    Reads per-channel and per-group W8A16 (scale (out, 1) or (out, in // g)); a non-zero offset is read as
    msmodelslim documents it, w ~= (q - offset) * scale.
    """
    description = json.loads((model_dir / DESCRIPTION).read_text())
    raw = read_tensors(model_dir, mapped)
    out: Shard = {}
    for name, kind in description.items():
        if not name.endswith(".weight") or kind == FLOAT or not isinstance(kind, str):
            continue  # header keys, FLOAT tensors and the scale / offset entries of quantized linears
        prefix = name.removesuffix("weight")
        if kind in ("W8A8", "W8A8_DYNAMIC"):
            out[name] = _read_w8a8(raw, prefix, kind)
            continue
        if kind != "W8A16":
            raise NpuflowError(f"{model_dir / DESCRIPTION}: {name} is {kind}; npuflow reads W8A16, W8A8, "
                               "W8A8_DYNAMIC and FLOAT")
        q = raw.pop(name)
        scale, offset = raw.pop(prefix + "weight_scale").float(), raw.pop(prefix + "weight_offset").float()
        group = None if scale.shape[1] == 1 else q.shape[1] // scale.shape[1]
        if group is None:
            scale, offset = scale[:, 0], offset[:, 0]  # (out,)
        zero = offset if offset.any() else None
        out[name] = QuantizedWeight(qweight=q, scale=scale, zero=zero, bits=8, group_size=group)
    out.update(raw)
    return out


def _read_w8a8(raw: dict[str, torch.Tensor], prefix: str, kind: str) -> QuantizedWeight:
    """A W8A8 linear back to QuantizedWeight; weight_scale from deq_scale / input_scale where it is absent
    (msModelSlim's own W8A8 files)."""
    q = raw.pop(prefix + "weight")
    if kind == "W8A8_DYNAMIC":
        scale = raw.pop(prefix + "weight_scale").float()[:, 0]
        raw.pop(prefix + "weight_offset", None)
        return QuantizedWeight(q, scale, None, 8, None, act="token")
    act_scale, act_offset = raw.pop(prefix + "input_scale").float(), raw.pop(prefix + "input_offset").float()
    deq = deq_scale_float(raw.pop(prefix + "deq_scale"))
    raw.pop(prefix + "quant_bias")
    raw.pop(prefix + "weight_offset", None)
    ws = raw.pop(prefix + "weight_scale", None)
    scale = ws.float()[:, 0] if ws is not None else deq / act_scale
    return QuantizedWeight(q, scale, None, 8, None, act="tensor", act_scale=act_scale, act_offset=act_offset)
