"""Quantize stage: weight-only integer quantization, streamed shard by shard from safetensors.

Layered as gpt-fast's quantize.py: tensor primitives, then one handler per scheme (same methods),
then one entry point (quantize_dir) that streams shards through a handler into a format writer.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

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
from npuflow.formats import QuantizedWeight, make_writer
from npuflow.store import Store

log = logging.getLogger("npuflow.quantize")

QUANT_MANIFEST = "quant_manifest.json"
INDEX = "model.safetensors.index.json"
LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM")  # same module names and weight layout
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# linear layers of a Llama decoder; each weight is (out_features, in_features)
LINEAR_SUFFIXES = tuple(f"{m}.weight" for m in LINEAR_MODULES)
HEAD_AND_EMBED = ("lm_head.weight", "model.embed_tokens.weight")  # quantized only when not ignored
CODE_VERSION = "quantize-3"  # bump when the output of a scheme changes, so old cache keys miss


# ---- primitives --------------------------------------------------------------------------------


def quantize_per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per output row: w (out, in) ~= q (out, in) * scale (out,)[:, None].

    Works through ~4 MB blocks of rows so the float32 temporaries stay in cache (2.5x faster than
    whole-tensor passes on 2 cores). A NaN/Inf anywhere in a row gives a non-finite scale.
    """
    lo, hi = torch.aminmax(w, dim=1)  # exact in the source dtype
    scale = torch.maximum(hi.float(), lo.float().neg()).clamp(min=1e-12) / 127.0  # (out,) fp32
    q = torch.empty(w.shape, dtype=torch.int8)
    rows = max(1, (1 << 20) // max(1, w.shape[1]))  # 1M fp32 elements per block
    for r in range(0, w.shape[0], rows):
        block = w[r : r + rows].to(torch.float32, copy=True)  # never modify the caller's tensor
        q[r : r + rows] = block.div_(scale[r : r + rows, None]).round_().clamp_(-127, 127)
    return q, scale


def dequantize_per_channel_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def group_params_asym(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max parameters per group: scale, zero (out, in // group_size), float32."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)  # (out, groups, g)
    lo = g.amin(dim=-1).clamp(max=0.0)  # the range always contains 0, so 0 is exact
    hi = g.amax(dim=-1).clamp(min=0.0)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def quantize_with_params(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(w / s) + z, 0, 2^bits - 1) with per-group s, z (out, in // g) -> uint8 (out, in)."""
    group = w.shape[1] // scale.shape[1]
    s = scale.repeat_interleave(group, dim=1)
    z = zero.repeat_interleave(group, dim=1)
    return (torch.round(w.float() / s) + z).clamp_(0, 2**bits - 1).to(torch.uint8)


def quantize_group_asym(w: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Round-to-nearest asymmetric group quantization of w (out, in)."""
    if w.shape[1] % group_size:
        raise NpuflowError(f"group size {group_size} does not divide the input dimension {w.shape[1]}")
    scale, zero = group_params_asym(w, bits, group_size)
    return QuantizedWeight(quantize_with_params(w, scale, zero, bits), scale, zero, bits, group_size)


# ---- handlers: one per scheme, same methods ------------------------------------------------------


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


# ---- streaming over shards -----------------------------------------------------------------------


def shard_names(model_dir: Path) -> list[str]:
    """The checkpoint's safetensors files in order; every file the index names must exist."""
    if (model_dir / INDEX).is_file():
        index = json.loads((model_dir / INDEX).read_text())
        shards = sorted(set(index["weight_map"].values()))
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


def _check_space(out_dir: Path, need: int, shard: str) -> None:
    """Refuse before writing when the output disk cannot hold this shard (output <= input size)."""
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise NpuflowError(
            f"not enough disk space to write {shard} to {out_dir}: {free / 1e6:.1f} MB free, up to "
            f"{need / 1e6:.1f} MB needed; free space or write elsewhere (nothing was published)"
        )


def _disk_error(err: OSError, out_dir: Path, what: str) -> NpuflowError:
    import errno

    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return NpuflowError(f"the disk filled up writing {what} to {out_dir}: free space or write elsewhere "
                            "(nothing was published)")
    return NpuflowError(f"writing {what} to {out_dir} failed: {err}")


def _corrupt(name: str, shard: str) -> str:
    return f"tensor {name} in {shard} has NaN or Inf values; the checkpoint is corrupt"


# Calibrated methods give the quantized weight of a linear by name (None: quantize it by rounding).
Precomputed = Mapping[str, QuantizedWeight] | Callable[[str], QuantizedWeight | None]


def quantize_dir(
    model_dir: Path, out_dir: Path, cfg: QuantizationConfig, precomputed: Precomputed | None = None,
    float_layers: frozenset[str] = frozenset(),
) -> dict:
    """Quantize model_dir into out_dir, one source shard in memory at a time; returns the quant manifest.

    `float_layers`: extra module names kept in float (the sensitivity fallback).
    """
    hf_config = json.loads((model_dir / "config.json").read_text())
    check_llama(hf_config)
    handler = get_handler(cfg)
    shapes = expected_shapes(hf_config)
    writer = make_writer(cfg.format, out_dir, cfg.scheme, hf_config)
    lookup = precomputed.get if isinstance(precomputed, Mapping) else precomputed
    ignore = tuple(cfg.ignore) + tuple(float_layers)
    tensors: dict[str, dict] = {}
    for shard in shard_names(model_dir):
        _check_space(out_dir, (model_dir / shard).stat().st_size, shard)
        out: dict[str, torch.Tensor | QuantizedWeight] = {}
        with safe_open(model_dir / shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                suffix = ".".join(name.rsplit(".", 2)[-2:])
                if suffix in shapes and tuple(t.shape) != shapes[suffix]:
                    raise NpuflowError(
                        f"tensor {name} in {shard} has shape {tuple(t.shape)} but config.json implies "
                        f"{shapes[suffix]}: the shards do not belong to this config"
                    )
                if is_target(name, ignore):
                    handler.check(name, t)
                    qw = (lookup(name) if lookup else None) or handler.quantize(t)
                    if not torch.isfinite(qw.scale).all():  # amax/amin propagate NaN and Inf
                        raise NpuflowError(_corrupt(name, shard))
                    out[name] = qw
                    tensors[name] = {"quantized": True, "dtype": f"int{qw.bits}", "shape": list(t.shape),
                                     "bits": qw.bits, "group_size": qw.group_size, "source_dtype": str(t.dtype)[6:]}
                else:
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        raise NpuflowError(_corrupt(name, shard))
                    out[name] = t
                    tensors[name] = {"quantized": False, "dtype": str(t.dtype)[6:], "shape": list(t.shape)}
        try:
            writer.add_shard(shard, out)
        except OSError as err:
            raise _disk_error(err, out_dir, shard) from None
        log.info("quantized %s (%d tensors)", shard, len(out))
        del out
    try:
        for p in model_dir.iterdir():  # config, tokenizer, generation files carried over unchanged
            if p.is_file() and not p.name.endswith(".safetensors") and p.name not in (INDEX, "SHA256SUMS"):
                shutil.copy2(p, out_dir / p.name)
        weight_files = writer.finish()
    except OSError as err:
        raise _disk_error(err, out_dir, "the config and index files") from None
    manifest = {
        "format": cfg.format,
        "scheme": cfg.scheme,
        "method": cfg.method,
        "group_size": handler.group_size,
        "bits": handler.bits,
        "ignore": list(cfg.ignore),
        "float_layers": sorted(float_layers),
        "npuflow_version": npuflow.__version__,
        "tensors": tensors,
        "files": {n: e.sha256 for n, e in hash_dir(out_dir, weight_files).items()},
    }
    (out_dir / QUANT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


SENSITIVITY = "sensitivity.json"
# linears that share an input are kept float together, never split: (group name, member modules)
FUSED_GROUPS = (
    ("self_attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.o_proj", ("self_attn.o_proj",)),
    ("mlp.gate_up", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.down_proj", ("mlp.down_proj",)),
)


def fused_group(name: str) -> tuple[str, tuple[str, ...]]:
    """model.layers.3.self_attn.k_proj.weight -> ("model.layers.3.self_attn.qkv", (q, k, v module names))."""
    module = name.removesuffix(".weight")
    for group, members in FUSED_GROUPS:
        for m in members:
            if module.endswith("." + m):
                base = module.removesuffix(m)
                return base + group, tuple(base + x for x in members)
    return module, (module,)


def rank_groups(errors: dict[str, float]) -> list[tuple[str, float, tuple[str, ...]]]:
    """Fused groups by their worst member's error, most sensitive first: (group, error, modules)."""
    worst: dict[str, tuple[float, tuple[str, ...]]] = {}
    for name, err in errors.items():
        group, members = fused_group(name)
        worst[group] = (max(err, worst.get(group, (0.0, ()))[0]), members)
    return sorted(((g, e, m) for g, (e, m) in worst.items()), key=lambda x: -x[1])


def quantize_model(model_dir: Path, out_dir: Path, cfg: QuantizationConfig,
                   float_layers: frozenset[str] = frozenset(), errors: dict[str, float] | None = None) -> dict:
    """quantize_dir with the configured method and the sensitivity report (sensitivity.json).

    GPTQ calibrates layer by layer first (its per-linear errors are the report); with RTN the report is
    measured separately on the same calibration windows unless `errors` is given.
    """
    from npuflow.gptq import calibration_windows, gptq_quantize, rtn_sensitivity
    from npuflow.validate import load_eval_text

    cal = cfg.calibration
    ignore = tuple(cfg.ignore) + tuple(float_layers)
    report: dict = {"method": cfg.method, "scheme": cfg.scheme, "group_size": cfg.group_size,
                    "calibration": cal.model_dump(), "float_layers": sorted(float_layers)}
    if cfg.method == "rtn":
        if cfg.sensitivity and errors is None:
            windows = calibration_windows(model_dir, load_eval_text(cal.text), cal.samples, cal.seq_len)
            errors = rtn_sensitivity(model_dir, get_handler(cfg), ignore, windows)
        qm = quantize_dir(model_dir, out_dir, cfg, float_layers=float_layers)
        report["output_error"] = {k: v for k, v in (errors or {}).items() if k in qm["tensors"]
                                  and qm["tensors"][k]["quantized"]}
    else:
        windows = calibration_windows(model_dir, load_eval_text(cal.text), cal.samples, cal.seq_len)
        with staging_dir("gptq") as work:
            result = gptq_quantize(model_dir, get_handler(cfg), ignore, windows, Path(work))
            qm = quantize_dir(model_dir, out_dir, cfg, precomputed=result, float_layers=float_layers)
            report["output_error"] = {k: v["gptq_err"] for k, v in result.stats.items()}
            report["rtn_output_error"] = {k: v["rtn_err"] for k, v in result.stats.items()}
    if cfg.sensitivity or cfg.method != "rtn":
        report["ranking"] = [{"group": g, "error": e} for g, e, _ in rank_groups(report["output_error"])]
        (out_dir / SENSITIVITY).write_text(json.dumps(report, indent=2))
    return qm


def quantize_with_fallback(model_dir: Path, out_dir: Path, cfg: QuantizationConfig, validation) -> dict:
    """fallback auto: keep the most sensitive fused groups float, one more at a time, until the validation
    gates pass (scored here on the CPU against the float reference) or fallback_budget groups are float."""
    import torch

    from npuflow.backends import cpu
    from npuflow.gptq import calibration_windows, rtn_sensitivity
    from npuflow.runtime import load_quantized, load_reference, load_tokenizer
    from npuflow.validate import compare, evaluate_gates, load_eval_text, make_windows

    cal = cfg.calibration
    windows = calibration_windows(model_dir, load_eval_text(cal.text), cal.samples, cal.seq_len)
    errors = rtn_sensitivity(model_dir, get_handler(cfg), tuple(cfg.ignore), windows)
    ranking = rank_groups(errors)
    tok = load_tokenizer(model_dir)
    tok.model_max_length = 1 << 62
    eval_windows = make_windows(tok(load_eval_text(validation.eval_text))["input_ids"], validation.seq_len,
                                validation.max_tokens)
    reference = load_reference(model_dir, torch.device("cpu"))
    attempts, float_layers = [], frozenset[str]()
    for kept in range(min(cfg.fallback_budget, len(ranking)) + 1):
        float_layers = frozenset(m for _, _, members in ranking[:kept] for m in members)
        with staging_dir("fallback") as tmp:
            quantize_model(model_dir, Path(tmp), cfg, float_layers, errors=errors)
            metrics = compare(reference, load_quantized(Path(tmp), cpu, torch.float32), eval_windows,
                              validation.batch_size, torch.device("cpu"))
        passed = all(g.passed for g in evaluate_gates(metrics, validation.gates).values())
        attempts.append({"float_groups": [g for g, _, _ in ranking[:kept]], "gates_passed": passed,
                         **{k: metrics[k] for k in ("ppl_delta_pct", "top1_agreement", "kl_divergence")}})
        log.info("fallback: %d float group(s) -> ppl %+.3f%%, top-1 %.4f, KL %.2e: gates %s", kept,
                 metrics["ppl_delta_pct"], metrics["top1_agreement"], metrics["kl_divergence"],
                 "pass" if passed else "fail")
        if passed:
            break
    qm = quantize_model(model_dir, out_dir, cfg, float_layers, errors=errors)
    report = json.loads((out_dir / SENSITIVITY).read_text())
    report["output_error"] = errors  # every target linear, the float-kept ones included
    report["ranking"] = [{"group": g, "error": e} for g, e, _ in ranking]
    report["fallback"] = {"budget": cfg.fallback_budget, "attempts": attempts}
    (out_dir / SENSITIVITY).write_text(json.dumps(report, indent=2))
    return qm


def quantize(model: ModelArtifact, cfg: QuantizationConfig, store: Store, cache_root: Path,
             validation=None) -> QuantizedArtifact:
    """The quantize stage: cache hit when the same model + config + code version is published.

    `validation` (ValidationConfig) is needed by fallback auto, which scores candidates against its gates.
    """
    if cfg.fallback == "auto" and validation is None:
        raise ConfigError("quantization.fallback auto needs the validation section (eval text and gates)")
    scoring = validation if cfg.fallback == "auto" else None
    key = f"models/{model.name}/quantized/{digest(model.manifest_sha256, cfg, scoring, CODE_VERSION)[:16]}"
    found = load_manifest(store, key, QuantizedArtifact)
    if found is not None:
        log.info("cache hit: %s", found.uri)
        return found
    src = materialize(store, model.key, model.files, cache_root)
    with staging_dir("quantize") as tmp:
        out = Path(tmp)
        qm = quantize_with_fallback(src, out, cfg, validation) if scoring else quantize_model(src, out, cfg)
        files: dict[str, FileEntry] = hash_dir(out)
        weights = sum(files[n].size for n in qm["files"])
        artifact = QuantizedArtifact(
            uri=store.url(key), key=key, name=model.name, source_manifest_sha256=model.manifest_sha256,
            scheme=cfg.scheme, group_size=qm["group_size"], format=cfg.format, files=files,
            quantized_tensors=sum(t["quantized"] for t in qm["tensors"].values()),
            float_tensors=sum(not t["quantized"] for t in qm["tensors"].values()),
            size_bytes=weights,
        )
        log.info("publishing %s: %d quantized, %d float tensors, %.2f MB", artifact.uri,
                 artifact.quantized_tensors, artifact.float_tensors, weights / 1e6)
        return publish(store, artifact, out)
