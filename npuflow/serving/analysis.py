"""Canary analysis (pure): one rollout stage's challenger statistics against its SLOs and the champion."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from npuflow.core.config import StageConfig
from npuflow.serving.promstats import VersionStats


class StageVerdict(BaseModel):
    """Like an Argo Rollouts analysis run: too little data is `inconclusive`, never a pass."""

    model_config = ConfigDict(frozen=True)
    result: Literal["pass", "fail", "inconclusive"]
    reasons: list[str]


def analyze_stage(stage: StageConfig, challenger: VersionStats, champion: VersionStats | None,
                  elapsed_s: float) -> StageVerdict:
    """Judge one stage from the statistics of its interval (see npuflow.serving.promstats.VersionStats.minus).

    fail: an SLO is broken (error rate, absolute p95 limits, p95 regression against the champion);
    inconclusive: fewer than min_requests challenger requests or shorter than min_duration_s, and nothing failed
    beyond doubt; pass: otherwise. The champion comparison is skipped (with a note) when it served nothing.
    """
    slo, failed, notes = stage.slo, [], []
    label = f"{stage.name} {stage.weight:g}%"
    n = challenger.requests
    if n > 0 and challenger.error_rate > slo.error_rate_max:
        failed.append(f"error rate {challenger.error_rate:.2%} ({challenger.errors:g}/{n:g}) > "
                      f"{slo.error_rate_max:.2%}")
    for which, limit, rel in (("ttft", slo.ttft_ms_p95_max, slo.ttft_regression_pct),
                              ("tpot", slo.tpot_ms_p95_max, slo.tpot_regression_pct)):
        mine = challenger.p95_ms(which)
        if mine is None:
            notes.append(f"{which} p95: no observations on the challenger")
            continue
        if limit is not None:
            (failed if mine > limit else notes).append(f"{which} p95 {mine:.3g} ms (limit {limit:g} ms)")
        if rel is None:
            continue
        theirs = champion.p95_ms(which) if champion is not None else None
        if theirs is None:
            notes.append(f"{which} p95: champion has no observations; relative limit not checked")
            continue
        bound = theirs * (1 + rel / 100)
        (failed if mine > bound else notes).append(
            f"{which} p95 {mine:.3g} ms vs champion {theirs:.3g} ms (limit +{rel:g}% = {bound:.3g} ms)")
    enough = n >= stage.min_requests and elapsed_s >= stage.min_duration_s
    data = f"{n:g} challenger requests in {elapsed_s:.1f} s (need {stage.min_requests}, {stage.min_duration_s:g} s)"
    if failed:
        return StageVerdict(result="fail", reasons=[f"{label}: " + "; ".join(failed), data, *notes])
    if not enough:
        return StageVerdict(result="inconclusive", reasons=[f"{label}: too little data: {data}", *notes])
    return StageVerdict(result="pass", reasons=[f"{label}: every SLO met", data, *notes])
