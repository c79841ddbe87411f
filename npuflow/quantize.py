"""Quantize stage: weight-only integer quantization, streamed shard by shard from safetensors."""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import npuflow
from npuflow.artifacts import (
    FileEntry,
    ModelArtifact,
    QuantizedArtifact,
    digest,
    hash_dir,
    load_manifest,
    materialize,
    publish,
    staging_dir,
)
from npuflow.config import QuantizationConfig
from npuflow.errors import ConfigError, NpuflowError
from npuflow.store import Store

log = logging.getLogger("npuflow.quantize")

QUANT_MANIFEST = "quant_manifest.json"
INDEX = "model.safetensors.index.json"
LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM")  # same module names and weight layout
# linear layers of a Llama decoder; each is (out_features, in_features)
LINEAR_SUFFIXES = tuple(
    f"{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
)
HEAD_AND_EMBED = ("lm_head.weight", "model.embed_tokens.weight")  # quantized only when not ignored
SCALE_SUFFIX = "weight_scale"
CODE_VERSION = "quantize-1"  # bump when the output of a scheme changes, so old cache keys miss


# ---- primitives --------------------------------------------------------------------------------


def quantize_per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per output row: w (out, in) ~= q (out, in) * scale (out,)[:, None]."""
    w32 = w.float()
    scale = w32.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,) fp32
    q = torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_per_channel_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


# ---- handlers: one per scheme, same methods ------------------------------------------------------


@dataclass
class W8A16:
    """int8 weights, symmetric, per output channel; activations stay in float (16-bit on devices)."""

    group_size: int | None = None
    bits: int = 8

    def quantize(self, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = quantize_per_channel_int8(w)
        return {name: q, name.removesuffix("weight") + SCALE_SUFFIX: scale}


SCHEMES = {"w8a16": W8A16}
FORMATS = ("native",)


def get_handler(scheme: str) -> W8A16:
    try:
        return SCHEMES[scheme]()
    except KeyError:
        raise ConfigError(f"invalid quantization scheme {scheme!r}; valid: {', '.join(SCHEMES)}") from None


# ---- streaming over shards -----------------------------------------------------------------------


@dataclass
class _Plan:
    shards: list[str]  # safetensors file names in order
    index: dict | None  # the model.safetensors.index.json, when sharded
    tensors: dict[str, dict] = field(default_factory=dict)  # name -> {dtype, shape, quantized}


def _shards(model_dir: Path) -> tuple[list[str], dict | None]:
    if (model_dir / INDEX).is_file():
        index = json.loads((model_dir / INDEX).read_text())
        shards = sorted(set(index["weight_map"].values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise NpuflowError(f"{INDEX} names shards that are missing: {', '.join(missing)}; re-fetch the model")
        return shards, index
    shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if len(shards) != 1:
        raise NpuflowError(
            f"{model_dir} has {len(shards)} safetensors files and no {INDEX}: expected one file or an index"
        )
    return shards, None


def _is_target(name: str, ignore: tuple[str, ...]) -> bool:
    if not (name.endswith(LINEAR_SUFFIXES) or name in HEAD_AND_EMBED):
        return False
    module = name.removesuffix(".weight")
    return not any(fnmatch.fnmatch(module, pat) or fnmatch.fnmatch(name, pat) for pat in ignore)


def quantize_dir(model_dir: Path, out_dir: Path, cfg: QuantizationConfig) -> dict:
    """Quantize model_dir into out_dir, one shard in memory at a time; returns the quant manifest."""
    hf_config = json.loads((model_dir / "config.json").read_text())
    archs = hf_config.get("architectures") or []
    if not set(archs) & set(LLAMA_FAMILY):
        raise NpuflowError(
            f"architecture {archs or 'unknown'} is not Llama-family; supported: {', '.join(LLAMA_FAMILY)}"
        )
    handler = get_handler(cfg.scheme)
    if cfg.format not in FORMATS:
        raise ConfigError(f"invalid format {cfg.format!r}; valid: {', '.join(FORMATS)}")
    shards, index = _shards(model_dir)
    tensors: dict[str, dict] = {}
    weight_map: dict[str, str] = {}
    for shard in shards:
        out: dict[str, torch.Tensor] = {}
        with safe_open(model_dir / shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise NpuflowError(f"tensor {name} in {shard} has NaN or Inf values; the checkpoint is corrupt")
                pieces = handler.quantize(name, t) if _is_target(name, cfg.ignore) else {name: t.contiguous()}
                for k, v in pieces.items():
                    out[k] = v
                    weight_map[k] = shard
                    tensors[k] = {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                                  "quantized": k == name and len(pieces) > 1}
        save_file(out, out_dir / shard, metadata={"format": "pt"})
        log.info("quantized %s (%d tensors)", shard, len(out))
        del out
    if index is not None:
        total = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))  # bytes, as HF writes it
        (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for p in model_dir.iterdir():  # config, tokenizer, generation files carried over unchanged
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in (INDEX, "SHA256SUMS"):
            shutil.copy2(p, out_dir / p.name)
    weight_files = sorted(p.name for p in out_dir.glob("*.safetensors"))
    manifest = {
        "format": cfg.format,
        "scheme": cfg.scheme,
        "group_size": handler.group_size,
        "bits": handler.bits,
        "ignore": list(cfg.ignore),
        "npuflow_version": npuflow.__version__,
        "tensors": tensors,
        "files": {n: e.sha256 for n, e in hash_dir(out_dir, weight_files).items()},
    }
    (out_dir / QUANT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def quantize(model: ModelArtifact, cfg: QuantizationConfig, store: Store, cache_root: Path) -> QuantizedArtifact:
    """The quantize stage: cache hit when the same model + config + code version is published."""
    key = f"models/{model.name}/quantized/{digest(model.manifest_sha256, cfg, CODE_VERSION)[:16]}"
    found = load_manifest(store, key, QuantizedArtifact)
    if found is not None:
        log.info("cache hit: %s", found.uri)
        return found
    src = materialize(store, model.key, model.files, cache_root)
    with staging_dir("quantize") as tmp:
        out = Path(tmp)
        qm = quantize_dir(src, out, cfg)
        files: dict[str, FileEntry] = hash_dir(out)
        weights = sum(e.size for n, e in files.items() if n.endswith(".safetensors"))
        artifact = QuantizedArtifact(
            uri=store.url(key), key=key, name=model.name, source_manifest_sha256=model.manifest_sha256,
            scheme=cfg.scheme, group_size=qm["group_size"], format=cfg.format, files=files,
            quantized_tensors=sum(t["quantized"] for t in qm["tensors"].values()),
            float_tensors=sum(1 for k, t in qm["tensors"].items() if not t["quantized"] and not k.endswith(SCALE_SUFFIX)),
            size_bytes=weights,
        )
        log.info("publishing %s: %d quantized, %d float tensors, %.2f MB", artifact.uri,
                 artifact.quantized_tensors, artifact.float_tensors, weights / 1e6)
        return publish(store, artifact, out)
