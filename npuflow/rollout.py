"""Promotion: a pure decision (candidate vs champion under the config's tolerances) and applying it."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict

from npuflow.config import PromotionConfig, StageConfig
from npuflow.promstats import VersionStats
from npuflow.registry import CHAMPION, PREVIOUS, ModelVersion, set_aliases, tag_version
from npuflow.tolerance import compare

log = logging.getLogger("npuflow.rollout")


class PromotionDecision(BaseModel):
    model_config = ConfigDict(frozen=True)
    action: Literal["promote", "keep_champion", "already_champion", "rollout"]  # rollout: staged, pending
    reasons: list[str]
    candidate_version: str
    champion_version: str | None

    @property
    def promote(self) -> bool:
        return self.action == "promote"


def decide_promotion(
    candidate: ModelVersion,
    candidate_metrics: dict[str, float],
    champion: ModelVersion | None,
    champion_metrics: dict[str, float],
    tol: PromotionConfig,
    tpot_regression_pct: float,
) -> PromotionDecision:
    """Promote when the gates passed and, against a champion, no metric is worse beyond tolerance: quality
    under `tol`, speed under the benchmark report's regression gate (`tpot_regression_pct`)."""
    champ_v = champion.version if champion else None

    def decision(action, reasons):
        return PromotionDecision(action=action, reasons=reasons, candidate_version=candidate.version,
                                 champion_version=champ_v)

    if candidate.tags.get("gates") != "passed":
        return decision("keep_champion", ["validation gates failed: a failed candidate is never promoted"])
    if candidate.tags.get("rollout") == "rolled_back":
        return decision("keep_champion", [f"version {candidate.version} was rolled back "
                                          f"({candidate.tags.get('rollback_reason', 'no reason recorded')}); "
                                          "release a new artifact instead of re-promoting it"])
    if champion is None:
        return decision("promote", ["no champion yet: the first candidate that passes its gates takes over"])
    if champion.version == candidate.version:
        return decision("already_champion", [f"version {candidate.version} is already the champion"])
    c = compare(candidate_metrics, champion_metrics, tol, tpot_regression_pct, f"champion v{champ_v}")
    if not c.passed:
        return decision("keep_champion", [f"worse than champion v{champ_v} beyond tolerance: "
                                          + "; ".join(c.failures), *c.notes])
    if tol.strategy == "rollout":
        return decision("rollout", [f"not worse than champion v{champ_v} beyond tolerance; promotion "
                                    "strategy rollout: it stays `candidate` until the staged rollout passes",
                                    *c.notes])
    return decision("promote", [f"not worse than champion v{champ_v} beyond tolerance", *c.notes])


def apply_promotion(c, candidate: ModelVersion, decision: PromotionDecision, approved_by: str) -> dict[str, str]:
    """Record the decision on the version, then move the aliases; returns the aliases before."""
    from npuflow.registry import aliases

    before = aliases(c, candidate.name)
    reason = " | ".join(decision.reasons)[:4900]
    if decision.action == "promote":
        tag_version(c, candidate, {"rollout": "promoted", "promotion_reason": reason, "approved_by": approved_by})
        set_aliases(c, candidate.name, {PREVIOUS: decision.champion_version, CHAMPION: candidate.version}
                    if decision.champion_version else {CHAMPION: candidate.version})
        log.info("champion -> version %s (previous: %s)", candidate.version, decision.champion_version)
    elif decision.action == "rollout":
        tag_version(c, candidate, {"rollout": "pending", "promotion_reason": reason})
        log.info("version %s waits for its staged rollout against champion %s", candidate.version,
                 decision.champion_version)
    elif decision.action == "keep_champion":
        keep = candidate.tags.get("rollout") == "rolled_back"  # that record stays as it is
        tag_version(c, candidate, {"promotion_reason": reason} if keep else {"rollout": "rejected",
                                                                            "promotion_reason": reason})
        log.info("champion stays version %s: %s", decision.champion_version, reason)
    return before


# ---- canary analysis (pure): one stage's challenger statistics against its SLOs and the champion ------


class StageVerdict(BaseModel):
    """Like an Argo Rollouts analysis run: too little data is `inconclusive`, never a pass."""

    model_config = ConfigDict(frozen=True)
    result: Literal["pass", "fail", "inconclusive"]
    reasons: list[str]


def analyze_stage(stage: StageConfig, challenger: VersionStats, champion: VersionStats | None,
                  elapsed_s: float) -> StageVerdict:
    """Judge one stage from the statistics of its interval (see npuflow.promstats.VersionStats.minus).

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
