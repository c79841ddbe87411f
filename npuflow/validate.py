"""Validate stage: candidate vs unquantized reference on an evaluation text, and the quality gates."""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import torch

from npuflow.artifacts import (
    Deployable,
    GateResult,
    ModelArtifact,
    QuantizedArtifact,
    ValidationReport,
    digest,
    load_manifest,
    materialize,
    publish,
)
from npuflow.backends import get_backend
from npuflow.config import GateConfig, ValidationConfig
from npuflow.errors import ConfigError, NpuflowError
from npuflow.runtime import DTYPES, load_quantized, load_reference, load_tokenizer
from npuflow.store import Store, open_store

log = logging.getLogger("npuflow.validate")
CODE_VERSION = "validate-1"


def load_eval_text(uri: str) -> str:
    """builtin:tiny-corpus (held out) | builtin:tiny-corpus-train | file://PATH | s3://bucket/key (UTF-8)."""
    if uri.startswith("builtin:"):
        from npuflow import tinymodel

        builtins = {
            "builtin:tiny-corpus": tinymodel.eval_text,
            "builtin:tiny-corpus-train": lambda: tinymodel.synthetic_corpus(2000, tinymodel.TINY_CORPUS_SEED_TRAIN),
        }
        if uri not in builtins:
            raise ConfigError(f"unknown built-in text {uri!r}; valid: {', '.join(builtins)}")
        return builtins[uri]()
    if uri.startswith("file://"):
        from npuflow.fetch import file_uri_path

        path = file_uri_path(uri)
        if not path.is_file():
            raise NpuflowError(f"text file {path} does not exist ({uri})")
        return path.read_text()
    if uri.startswith("s3://"):
        bucket_prefix, _, key = uri.removeprefix("s3://").partition("/")
        return open_store(f"s3://{bucket_prefix}").read_bytes(key).decode()
    raise ConfigError(f"unknown text uri {uri!r}; valid: builtin:tiny-corpus, file://PATH, s3://BUCKET/KEY")


def make_windows(token_ids: list[int], seq_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows (N, seq_len) from the first max_tokens tokens."""
    ids = torch.tensor(token_ids[:max_tokens], dtype=torch.long)
    n = ids.numel() // seq_len
    if n == 0:
        raise NpuflowError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "use a longer text or a smaller validation.seq_len"
        )
    return ids[: n * seq_len].view(n, seq_len)


@torch.inference_mode()
def compare(reference, candidate, windows: torch.Tensor, batch_size: int, device: torch.device) -> dict[str, float]:
    """Perplexities, top-1 agreement and KL(reference || candidate) over the same next-token positions."""
    nll_ref = nll_cand = kl = 0.0
    agree = count = 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)  # (B, T)
        target = ids[:, 1:]  # (B, T-1): the next token at each scored position
        lp_ref = torch.log_softmax(reference(ids).logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        lp_cand = torch.log_softmax(candidate(ids).logits[:, :-1].float(), dim=-1)
        nll_ref -= lp_ref.gather(-1, target.unsqueeze(-1)).sum().item()
        nll_cand -= lp_cand.gather(-1, target.unsqueeze(-1)).sum().item()
        kl += (lp_ref.exp() * (lp_ref - lp_cand)).sum().item()
        agree += (lp_ref.argmax(-1) == lp_cand.argmax(-1)).sum().item()
        count += target.numel()
    ppl_ref, ppl_cand = math.exp(nll_ref / count), math.exp(nll_cand / count)
    return {
        "ppl_reference": ppl_ref,
        "ppl_candidate": ppl_cand,
        "ppl_delta_pct": 100.0 * (ppl_cand - ppl_ref) / ppl_ref,
        "top1_agreement": agree / count,
        "kl_divergence": kl / count,
        "eval_tokens": float(count),
    }


def evaluate_gates(metrics: dict[str, float], gates: GateConfig) -> dict[str, GateResult]:
    """Pure: each gate's value against its threshold."""
    rules = {
        "ppl_delta_pct": ("<=", gates.ppl_delta_pct_max),
        "top1_agreement": (">=", gates.top1_agreement_min),
        "kl_divergence": ("<=", gates.kl_divergence_max),
    }
    out = {}
    for name, (op, threshold) in rules.items():
        value = metrics[name]
        out[name] = GateResult(
            passed=value <= threshold if op == "<=" else value >= threshold, value=value, threshold=threshold, op=op
        )
    return out


def validate(
    model: ModelArtifact, deployable: Deployable, cfg: ValidationConfig, store: Store, cache_root: Path
) -> ValidationReport:
    """Score reference and candidate; cache the metrics, evaluate the gates from the current config."""
    text = load_eval_text(cfg.eval_text)
    text_sha = hashlib.sha256(text.encode()).hexdigest()
    measured = cfg.model_dump(exclude={"gates", "eval_text"})
    key = f"models/{model.name}/validation/" + digest(
        model.manifest_sha256, deployable.manifest_sha256, measured, text_sha, CODE_VERSION
    )[:16]
    found = load_manifest(store, key, ValidationReport)
    if found is not None:
        log.info("cache hit: %s", found.uri)
        return found.model_copy(update={"gates": evaluate_gates(found.metrics, cfg.gates)})
    backend = get_backend(deployable.device)
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
    reference = load_reference(ref_dir, backend.device(), ref_dtype)
    candidate = load_quantized(cand_dir, backend, dtype)
    metrics = compare(reference, candidate, windows, cfg.batch_size, backend.device())
    eval_tokens = int(metrics.pop("eval_tokens"))
    report = ValidationReport(
        uri=store.url(key), key=key, deployable_manifest_sha256=deployable.manifest_sha256,
        eval_text_sha256=text_sha, eval_tokens=eval_tokens, metrics=metrics,
        gates=evaluate_gates(metrics, cfg.gates),
    )
    log.info("ppl reference %.4f candidate %.4f (%+.3f%%), top-1 %.4f, KL %.5f", metrics["ppl_reference"],
             metrics["ppl_candidate"], metrics["ppl_delta_pct"], metrics["top1_agreement"], metrics["kl_divergence"])
    return publish(store, report)
