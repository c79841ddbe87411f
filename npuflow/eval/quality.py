"""Quality of a candidate against its reference on the same positions (perplexities, top-1 agreement,
KL divergence) and the gates on them: used by validation and by quantization's fallback."""

from __future__ import annotations

import math

import torch

from npuflow.core.artifacts import GateResult
from npuflow.core.config import GateConfig


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
