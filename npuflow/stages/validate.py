"""Validate stage: candidate vs unquantized reference on an evaluation text, and the quality gates."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from npuflow.core.artifacts import (
    Deployable,
    ModelArtifact,
    QuantizedArtifact,
    ValidationReport,
    digest,
    load_manifest,
    materialize,
    publish,
)
from npuflow.core.config import ValidationConfig
from npuflow.core.errors import NpuflowError
from npuflow.core.store import Store
from npuflow.core.text import load_eval_text, make_windows
from npuflow.eval.quality import compare, evaluate_gates
from npuflow.runtime.backends import get_backend
from npuflow.runtime.loader import DTYPES, load_quantized, load_reference, load_tokenizer

log = logging.getLogger("npuflow.validate")
CODE_VERSION = "validate-1"


def validate(
    model: ModelArtifact, deployable: Deployable, cfg: ValidationConfig, store: Store, cache_root: Path
) -> ValidationReport:
    """Score reference and candidate; cache the metrics, evaluate the gates from the current config."""
    text = load_eval_text(cfg.eval_text)
    text_sha = hashlib.sha256(text.encode()).hexdigest()
    measured = cfg.model_dump(exclude={"gates", "eval_text"} | ({"tp", "pp"} if cfg.tp * cfg.pp == 1 else set()))
    key = f"models/{model.name}/validation/" + digest(
        model.manifest_sha256, deployable.manifest_sha256, measured, text_sha, CODE_VERSION
    )[:16]
    found = load_manifest(store, key, ValidationReport)
    if found is not None:
        log.info("cache hit: %s", found.uri)
        return found.model_copy(update={"gates": evaluate_gates(found.metrics, cfg.gates)})
    get_backend(deployable.device)  # unavailable device: its reason, before any work
    quantized = load_manifest(store, deployable.quantized_key, QuantizedArtifact)
    if quantized is None:
        raise NpuflowError(f"the quantized weights {deployable.quantized_key} are gone from the store; re-run quantize")
    ref_dir = materialize(store, model.key, model.files, cache_root)
    cand_dir = materialize(store, quantized.key, quantized.files, cache_root)
    dtype = DTYPES[deployable.dtype]
    ref_dtype = torch.float32 if deployable.device == "cpu" else dtype
    tokenizer = load_tokenizer(ref_dir)
    tokenizer.model_max_length = 1 << 62  # the text is cut into windows below, not fed whole
    windows = make_windows(tokenizer(text)["input_ids"], cfg.seq_len, cfg.max_tokens)
    log.info("scoring %d windows of %d tokens (reference %s, candidate %s)", windows.shape[0], cfg.seq_len,
             ref_dtype, dtype)
    metrics = score(ref_dir, cand_dir, windows, cfg, deployable.device, dtype, ref_dtype)
    eval_tokens = int(metrics.pop("eval_tokens"))
    report = ValidationReport(
        uri=store.url(key), key=key, deployable_manifest_sha256=deployable.manifest_sha256,
        eval_text_sha256=text_sha, eval_tokens=eval_tokens, metrics=metrics,
        gates=evaluate_gates(metrics, cfg.gates),
    )
    log.info("ppl reference %.4f candidate %.4f (%+.3f%%), top-1 %.4f, KL %.5f", metrics["ppl_reference"],
             metrics["ppl_candidate"], metrics["ppl_delta_pct"], metrics["top1_agreement"], metrics["kl_divergence"])
    return publish(store, report)


def score(ref_dir: Path, cand_dir: Path, windows: torch.Tensor, cfg: ValidationConfig, device: str,
          dtype: torch.dtype, ref_dtype: torch.dtype) -> dict[str, float]:
    """compare() in this process, or on cfg.tp x cfg.pp ranks with reference and candidate sharded alike."""
    backend = get_backend(device)
    if cfg.tp * cfg.pp == 1:
        reference = load_reference(ref_dir, backend.device(), ref_dtype)
        candidate = load_quantized(cand_dir, backend, dtype)
        return compare(reference, candidate, windows, cfg.batch_size, backend.device())
    from npuflow.runtime.pipeline import launch_task

    name = {v: k for k, v in DTYPES.items()}
    log.info("scoring on tp = %d x pp = %d ranks", cfg.tp, cfg.pp)
    out = launch_task("validate", cand_dir, device, name[dtype], cfg.tp, cfg.pp,
                      {"reference": str(ref_dir), "reference_dtype": name[ref_dtype], "windows": windows.tolist(),
                       "batch_size": cfg.batch_size})
    return {k: out[k] for k in ("ppl_reference", "ppl_candidate", "ppl_delta_pct", "top1_agreement",
                                "kl_divergence", "eval_tokens")}
