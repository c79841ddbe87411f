"""Convert stage: make a quantized artifact ready for one device, smoke-test it there, record versions."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from npuflow.core.artifacts import (
    Deployable,
    QuantizedArtifact,
    digest,
    hash_dir,
    load_manifest,
    materialize,
    publish,
    staging_dir,
)
from npuflow.core.config import ConvertConfig, ServingConfig
from npuflow.core.engines import engine_dtype, engine_problem, offline_problem
from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.core.store import Store
from npuflow.runtime.backends import get_backend
from npuflow.runtime.loader import load_quantized, resolve_dtype

log = logging.getLogger("npuflow.convert")
CODE_VERSION = "convert-3"  # 2: optional offline model; 3: the serving engine recorded
SMOKE_TOKENS = 16  # prompt length of the smoke forward pass


def smoke_test(model: torch.nn.Module, vocab_size: int, device: torch.device) -> str:
    """One forward pass on fixed tokens; the logits must be finite. Returns a short fingerprint."""
    ids = (torch.arange(SMOKE_TOKENS, device=device) * 7919 % vocab_size).unsqueeze(0)  # (1, T)
    with torch.inference_mode():
        logits = model(ids).logits.float()  # (1, T, vocab)
    if not torch.isfinite(logits).all():
        raise NpuflowError("smoke test failed: the converted model produced NaN/Inf logits")
    return fingerprint(logits[0, -1, :8])


def fingerprint(last_logits: torch.Tensor) -> str:
    """sha256 of the first 8 logits of the last position, float32 rounded to 2 decimals."""
    return hashlib.sha256(last_logits.float().round(decimals=2).cpu().numpy().tobytes()).hexdigest()


def smoke_test_ranks(model_dir: Path, cfg: ConvertConfig, dtype: torch.dtype) -> str:
    """The smoke test on cfg.tp x cfg.pp ranks (torchrun), each reading only its part of the weights."""
    from npuflow.runtime.pipeline import launch_task

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tokens = (torch.arange(SMOKE_TOKENS) * 7919 % vocab).tolist()
    log.info("smoke test on tp = %d x pp = %d ranks", cfg.tp, cfg.pp)
    out = launch_task("smoke", model_dir, cfg.device, str(dtype).removeprefix("torch."), cfg.tp, cfg.pp,
                      {"tokens": tokens})
    if not out["finite"]:
        raise NpuflowError("smoke test failed: the converted model produced NaN/Inf logits")
    return fingerprint(torch.tensor(out["last_logits"]))


def convert(quantized: QuantizedArtifact, cfg: ConvertConfig, store: Store, cache_root: Path,
            serving: ServingConfig | None = None) -> Deployable:
    """Check the engine and the device first (before any work), then load, smoke-test and publish the
    descriptor. The deployable records the engine that serves it; for vLLM the weights it loads are the
    quantized artifact's own files (compressed-tensors, or msmodelslim on Ascend), smoke-tested here with
    npuflow's loader of the same format."""
    engine = (serving or ServingConfig()).engine
    problem = engine_problem(engine, cfg.device, quantized.scheme, quantized.format, cfg.dtype)
    if problem is not None:
        raise ConfigError(f"convert: {problem}")
    if cfg.offline is not None and (why := offline_problem(quantized.scheme)) is not None:
        raise ConfigError(f"convert.offline: {why}")
    backend = get_backend(cfg.device)
    dtype = resolve_dtype(engine_dtype(engine, cfg.device, cfg.dtype), backend)
    versions = backend.versions()
    device_name = backend.device_name()
    key = f"models/{quantized.name}/deployable/" + digest(
        quantized.manifest_sha256, cfg, device_name, versions, CODE_VERSION, engine
    )[:16]
    found = load_manifest(store, key, Deployable)
    if found is not None:
        log.info("cache hit: %s", found.uri)
        return found
    model_dir = materialize(store, quantized.key, quantized.files, cache_root)
    if cfg.tp * cfg.pp > 1:
        smoke = smoke_test_ranks(model_dir, cfg, dtype)
    else:
        model = load_quantized(model_dir, backend, dtype, graph=cfg.graph)
        smoke = smoke_test(model, model.config.vocab_size, backend.device())
    deployable = Deployable(
        uri=store.url(key), key=key, name=quantized.name, quantized_manifest_sha256=quantized.manifest_sha256,
        quantized_key=quantized.key, device=cfg.device, device_name=device_name,
        runtime="npuflow-graph" if cfg.graph else "npuflow-eager", dtype=str(dtype).removeprefix("torch."),
        kernels=backend.kernels(dtype), versions=versions, smoke_logits_sha256=smoke, engine=engine,
    )
    log.info("converted for %s (%s, %s, served by %s): smoke test passed", cfg.device, device_name,
             deployable.dtype, engine)
    if cfg.offline is None:
        return publish(store, deployable)
    from npuflow.runtime.offline import export_onnx

    with staging_dir("convert") as tmp:
        o = cfg.offline
        result = export_onnx(model_dir, Path(tmp) / "offline", seq_len=o.seq_len, batch_size=o.batch_size,
                             soc_version=o.soc_version)
        log.info("offline model: ONNX checked with onnxruntime (max |diff| %.2g); atc: %s",
                 result.check.max_abs_diff, result.atc.status)
        deployable = deployable.model_copy(update={
            "files": hash_dir(Path(tmp)), "offline": result.model_dump(mode="json", exclude={"output"})})
        return publish(store, deployable, Path(tmp))
