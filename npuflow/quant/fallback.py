"""fallback auto: keep the most sensitive fused groups float until the validation gates pass."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from npuflow.core.artifacts import staging_dir
from npuflow.core.config import QuantizationConfig
from npuflow.quant.model import quantize_model
from npuflow.quant.schemes import get_handler
from npuflow.quant.sensitivity import SENSITIVITY, rank_groups

log = logging.getLogger("npuflow.quantize")


def quantize_with_fallback(model_dir: Path, out_dir: Path, cfg: QuantizationConfig, validation) -> dict:
    """fallback auto: keep the most sensitive fused groups float, one more at a time, until the validation
    gates pass (scored here on the CPU against the float reference) or fallback_budget groups are float."""
    import torch

    from npuflow.core.text import load_eval_text, make_windows
    from npuflow.eval.quality import compare, evaluate_gates
    from npuflow.quant.sensitivity import calibration_inputs, rtn_sensitivity
    from npuflow.runtime.backends import cpu
    from npuflow.runtime.loader import load_quantized, load_reference, load_tokenizer

    # the scoring text is checked with the calibration text, before any work
    windows = calibration_inputs(model_dir, cfg, {"validation.eval_text": validation.eval_text})
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
