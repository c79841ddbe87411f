"""quantize_dir: a checkpoint quantized one source shard in memory at a time, through a format writer."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

import npuflow
from npuflow.core.artifacts import hash_dir
from npuflow.core.config import QuantizationConfig
from npuflow.core.errors import NpuflowError
from npuflow.formats import QuantizedWeight, make_writer
from npuflow.quant.checkpoint import (
    INDEX,
    QUANT_MANIFEST,
    check_llama,
    expected_shapes,
    is_target,
    shard_names,
)
from npuflow.quant.schemes import for_tensor, get_handler

log = logging.getLogger("npuflow.quantize")


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


# Calibrated methods give the quantized weight of a linear by name (None: quantize it by rounding), and may
# give a float tensor for a non-target (SmoothQuant's smoothed norm weights).
Precomputed = Mapping[str, QuantizedWeight | torch.Tensor] | Callable[[str], QuantizedWeight | torch.Tensor | None]


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
    for shard in tqdm(shard_names(model_dir), desc="quantize", unit="shard", disable=None):
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
                    h = for_tensor(handler, name)
                    h.check(name, t)
                    qw = (lookup(name) if lookup else None) or h.quantize(t)
                    if not torch.isfinite(qw.scale).all():  # amax/amin propagate NaN and Inf
                        raise NpuflowError(_corrupt(name, shard))
                    out[name] = qw
                    tensors[name] = {"quantized": True, "dtype": f"int{qw.bits}", "shape": list(t.shape),
                                     "bits": qw.bits, "group_size": qw.group_size, "source_dtype": str(t.dtype)[6:]}
                else:
                    if lookup is not None and isinstance(new := lookup(name), torch.Tensor):
                        t = new  # a calibrated method's float replacement (SmoothQuant's smoothed norm weights)
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
