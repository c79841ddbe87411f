"""A Llama checkpoint as the quantizer reads it: shard names, which tensors are targets, expected shapes."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from npuflow.core.errors import NpuflowError
from npuflow.core.paths import confined

QUANT_MANIFEST = "quant_manifest.json"
INDEX = "model.safetensors.index.json"
LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM")  # same module names and weight layout
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# linear layers of a Llama decoder; each weight is (out_features, in_features)
LINEAR_SUFFIXES = tuple(f"{m}.weight" for m in LINEAR_MODULES)
HEAD_AND_EMBED = ("lm_head.weight", "model.embed_tokens.weight")  # quantized only when not ignored


def shard_names(model_dir: Path) -> list[str]:
    """The checkpoint's safetensors files in order; every file the index names must exist.

    Each name stays inside model_dir (no `..` part, no absolute path): a crafted index
    is refused here, before any shard is read or any output written.
    """
    if (model_dir / INDEX).is_file():
        try:
            index = json.loads((model_dir / INDEX).read_text())
            weight_map = index["weight_map"]
            shards = sorted(set(weight_map.values()), key=str)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise NpuflowError(f"{model_dir / INDEX} is not a valid safetensors index ({err!r}); "
                               "re-fetch the model") from None
        for s in shards:
            confined(model_dir, s, source=str(model_dir / INDEX))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise NpuflowError(f"{INDEX} names shards that are missing: {', '.join(missing)}; re-fetch the model")
        return shards
    shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if len(shards) != 1:
        raise NpuflowError(
            f"{model_dir} has {len(shards)} safetensors files and no {INDEX}: expected one file or an index"
        )
    return shards


def is_target(name: str, ignore: tuple[str, ...]) -> bool:
    """A weight this run quantizes: a linear (or the head/embedding) whose module no pattern ignores."""
    if not (name.endswith(LINEAR_SUFFIXES) or name in HEAD_AND_EMBED):
        return False
    module = name.removesuffix(".weight")
    return not any(fnmatch.fnmatch(module, pat) or fnmatch.fnmatch(name, pat) for pat in ignore)


def check_llama(hf_config: dict) -> None:
    archs = hf_config.get("architectures") or []
    if not set(archs) & set(LLAMA_FAMILY):
        raise NpuflowError(
            f"architecture {archs or 'unknown'} is not Llama-family; supported: {', '.join(LLAMA_FAMILY)}"
        )


def expected_shapes(hf_config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear suffix from config.json, to catch shards that do not match it."""
    d, ffn = hf_config["hidden_size"], hf_config["intermediate_size"]
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or d // heads
    kv = hf_config.get("num_key_value_heads") or heads
    return {
        "q_proj.weight": (heads * head_dim, d), "k_proj.weight": (kv * head_dim, d),
        "v_proj.weight": (kv * head_dim, d), "o_proj.weight": (d, heads * head_dim),
        "gate_proj.weight": (ffn, d), "up_proj.weight": (ffn, d), "down_proj.weight": (d, ffn),
    }
