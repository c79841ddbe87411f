"""msmodelslim format: the layout vllm-ascend (`--quantization ascend`) and MindIE load on Ascend NPUs.

Per quantized linear `X` (HF module names; vllm-ascend AscendW8A16LinearMethod):
  X.weight         int8    (out, in)  q in [-127, 127]
  X.weight_scale   float32 (out, 1)   w ~= q * scale
  X.weight_offset  float32 (out, 1)   all zeros: npuflow's int8 is symmetric
Everything else (norms, embeddings, lm_head when ignored) keeps its name and float dtype.

quant_model_description.json: {"model_quant_type": "W8A16", "version": "1.0.0", "group_size": 0,
  <every tensor name>: "W8A16" | "FLOAT"}; it alone says which tensors are integer (never the file names).
Weights: quant_model_weight_w8a16.safetensors, or, for a sharded source, quant_model_weight_w8a16-0000i-of-0000N
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
QUANT_TYPES = {"w8a16": "W8A16"}
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
        part = f"quant_model_weight_{self.scheme}-{len(self.parts) + 1:05d}-of-00000.safetensors"
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
        n, stem = len(self.parts), f"quant_model_weight_{self.scheme}"
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


def read(model_dir: Path) -> Shard:
    """Tensors by HF name; quant_model_description.json says which are W8A16 (the file names never do).

    Reads per-channel and per-group W8A16 (scale (out, 1) or (out, in // g)); a non-zero offset is read as
    msmodelslim documents it, w ~= (q - offset) * scale.
    """
    description = json.loads((model_dir / DESCRIPTION).read_text())
    raw = read_tensors(model_dir)
    out: Shard = {}
    for name, kind in description.items():
        if not name.endswith(".weight") or kind == FLOAT or not isinstance(kind, str):
            continue  # header keys, FLOAT tensors and the scale / offset entries of quantized linears
        if kind != "W8A16":
            raise NpuflowError(f"{model_dir / DESCRIPTION}: {name} is {kind}; npuflow reads W8A16 and FLOAT")
        prefix = name.removesuffix("weight")
        q = raw.pop(name)
        scale, offset = raw.pop(prefix + "weight_scale").float(), raw.pop(prefix + "weight_offset").float()
        group = None if scale.shape[1] == 1 else q.shape[1] // scale.shape[1]
        if group is None:
            scale, offset = scale[:, 0], offset[:, 0]  # (out,)
        zero = offset if offset.any() else None
        out[name] = QuantizedWeight(qweight=q, scale=scale, zero=zero, bits=8, group_size=group)
    out.update(raw)
    return out
