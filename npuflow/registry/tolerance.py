"""How much worse than a baseline a model may be: promotion (candidate vs champion) and the nightly
check (champion now vs its registration) apply the same rules.

Quality: perplexity at most `ppl_regression_pct` % higher, top-1 agreement at most `top1_drop_max` lower
(PromotionConfig). Speed: the benchmark report's regression gate, TPOT p50 of the primary and of every
scenario both sides measured at most `tpot_regression_pct` % higher (BenchmarkConfig, one tolerance for
the report and for the decision). Better is never worse.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from npuflow.bench.report import regression_gate
from npuflow.core.artifacts import GateResult
from npuflow.core.config import PromotionConfig


class Comparison(BaseModel):
    model_config = ConfigDict(frozen=True)
    passed: bool
    failures: list[str]  # what is worse beyond tolerance
    notes: list[str]  # what is within tolerance, or could not be compared
    checks: dict[str, GateResult]  # metric -> new value against its limit


def compare(new: dict[str, float], old: dict[str, float], tol: PromotionConfig, tpot_regression_pct: float,
            baseline: str = "champion") -> Comparison:
    """`new` against `old` (the baseline, named `baseline` in the messages)."""
    failures, notes, checks = [], [], {}
    # (metric, which direction is worse, allowed slack, % of the baseline or absolute)
    for metric, bad, slack, kind in (("ppl_candidate", "higher", tol.ppl_regression_pct, "pct"),
                                     ("top1_agreement", "lower", tol.top1_drop_max, "abs")):
        value, ref = new.get(metric), old.get(metric)
        if value is None or ref is None:
            notes.append(f"{metric}: not compared (missing on {'this side' if value is None else baseline})")
            continue
        sign = 1 if bad == "higher" else -1
        limit = ref * (1 + sign * slack / 100) if kind == "pct" else ref + sign * slack
        worse = math.isnan(value) or (value > limit if bad == "higher" else value < limit)
        checks[metric] = GateResult(passed=not worse, value=value, threshold=limit,
                                    op="<=" if bad == "higher" else ">=")
        change = f"{100 * (value - ref) / ref:+.2f}%" if kind == "pct" and ref else f"{value - ref:+.4g}"
        allowed = f"{'+' if sign > 0 else '-'}{slack:g}{'%' if kind == 'pct' else ''}"
        line = f"{metric}: {value:.4g} vs {baseline} {ref:.4g} ({change}, allowed {allowed})"
        (failures if worse else notes).append(line)
    gate = regression_gate(new, old, tpot_regression_pct)
    checks |= gate.checks
    if gate.passed:
        notes += gate.reasons
    else:
        failures.append(gate.reasons[0])
        notes += gate.reasons[1:]
    return Comparison(passed=not failures, failures=failures, notes=notes, checks=checks)
