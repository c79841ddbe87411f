"""Promotion: a pure decision (candidate vs champion under the config's tolerances) and applying it."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict

from npuflow.core.config import PromotionConfig
from npuflow.core.errors import NpuflowError
from npuflow.core.names import LEGACY_ROLLBACK_REASON, Alias, RolloutState, Tag
from npuflow.registry.client import ModelVersion, tag_version
from npuflow.registry.tolerance import compare

log = logging.getLogger("npuflow.rollout")


class PromotionDecision(BaseModel):
    model_config = ConfigDict(frozen=True)
    action: Literal["promote", "keep_champion", "already_champion", Tag.ROLLOUT]  # rollout: staged, pending
    reasons: list[str]
    candidate_version: str
    champion_version: str | None

    @property
    def promote(self) -> bool:
        return self.action == "promote"


def rollout_reason(tags: dict[str, str]) -> str:
    """Why a version is in its rollout state, whoever wrote it (a rollout, a rollback, an older npuflow)."""
    return tags.get(Tag.ROLLOUT_REASON) or tags.get(LEGACY_ROLLBACK_REASON) or "no reason recorded"


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

    if candidate.tags.get(Tag.GATES) != "passed":
        return decision("keep_champion", ["validation gates failed: a failed candidate is never promoted"])
    if candidate.tags.get(Tag.ROLLOUT) == RolloutState.ROLLED_BACK:
        return decision("keep_champion", [f"version {candidate.version} was rolled back "
                                          f"({rollout_reason(candidate.tags)}); "
                                          "release a new artifact instead of re-promoting it"])
    if champion is None:
        return decision("promote", ["no champion yet: the first candidate that passes its gates takes over"])
    if champion.version == candidate.version:
        return decision("already_champion", [f"version {candidate.version} is already the champion"])
    if Tag.ARTIFACTS_LOST in champion.tags and \
            champion.tags.get(Tag.ARTIFACT_SHA256) == candidate.tags.get(Tag.ARTIFACT_SHA256):
        return decision("promote", [f"champion v{champ_v} lost its artifacts ({champion.tags[Tag.ARTIFACTS_LOST]}); "
                                    f"version {candidate.version} is the same artifact registered anew and "
                                    "takes its place (no comparison or rollout: nothing changed but the copy)"])
    c = compare(candidate_metrics, champion_metrics, tol, tpot_regression_pct, f"champion v{champ_v}")
    if not c.passed:
        return decision("keep_champion", [f"worse than champion v{champ_v} beyond tolerance: "
                                          + "; ".join(c.failures), *c.notes])
    if tol.strategy == "rollout":
        return decision("rollout", [f"not worse than champion v{champ_v} beyond tolerance; promotion "
                                    "strategy rollout: it stays `candidate` until the staged rollout passes",
                                    *c.notes])
    return decision("promote", [f"not worse than champion v{champ_v} beyond tolerance", *c.notes])


class AliasMovedError(NpuflowError):
    """The aliases changed between the decision and its write: nothing is written."""


def _v(version: str | None) -> str:
    return f"version {version}" if version else "none"


def apply_promotion(c, candidate: ModelVersion, decision: PromotionDecision, approved_by: str) -> dict[str, str]:
    """Record the decision on the version, then move the aliases; returns the aliases before."""
    from npuflow.registry.client import aliases, move_aliases, repair_alias_moves

    repair_alias_moves(c, candidate.name)  # a move a crash left half-done is finished first
    before = aliases(c, candidate.name)
    reason = " | ".join(decision.reasons)[:4900]
    if decision.action in ("promote", "rollout") and before.get(Alias.CHAMPION) != decision.champion_version:
        raise AliasMovedError(  # compare-before-write: the decision was made against another champion
            f"{candidate.name}: the champion moved from {_v(decision.champion_version)} to "
            f"{_v(before.get(Alias.CHAMPION))} since version {candidate.version} was compared with it (another "
            "release, a rollback or a person); nothing was promoted. Re-run the release to compare with the "
            "champion now")
    if decision.action == "promote":
        tag_version(c, candidate, {Tag.ROLLOUT: RolloutState.PROMOTED, Tag.PROMOTION_REASON: reason, Tag.APPROVED_BY: approved_by})
        move_aliases(c, candidate, {Alias.PREVIOUS: decision.champion_version, Alias.CHAMPION: candidate.version}
                     if decision.champion_version else {Alias.CHAMPION: candidate.version})
        log.info("champion -> version %s (previous: %s)", candidate.version, decision.champion_version)
    elif decision.action == "rollout":
        tag_version(c, candidate, {Tag.ROLLOUT: RolloutState.PENDING, Tag.PROMOTION_REASON: reason})
        log.info("version %s waits for its staged rollout against champion %s", candidate.version,
                 decision.champion_version)
    elif decision.action == "keep_champion":
        # a rolled-back version's record stays as it is; so does a former champion's (released again after a
        # newer one took over, it is still `previous` or history, not a rejected candidate)
        keep = candidate.tags.get(Tag.ROLLOUT) in (RolloutState.ROLLED_BACK, RolloutState.PROMOTED,
                                                   RolloutState.RESTORED)
        tag_version(c, candidate, {Tag.PROMOTION_REASON: reason} if keep else {Tag.ROLLOUT: RolloutState.REJECTED,
                                                                            "promotion_reason": reason})
        log.info("champion stays version %s: %s", decision.champion_version, reason)
    return before


def promote(c, candidate: ModelVersion, tol: PromotionConfig, tpot_regression_pct: float,
            approved_by: str) -> PromotionDecision:
    """Read the champion (fail closed: a registry error raises, it never reads as "no champion"), decide,
    record and apply. Nothing is written when a read fails."""
    from npuflow.registry.client import by_alias, repair_alias_moves, run_metrics

    repair_alias_moves(c, candidate.name)  # before the champion is read: a half-done move is finished
    champion = by_alias(c, candidate.name, Alias.CHAMPION)
    decision = decide_promotion(candidate, run_metrics(c, candidate), champion,
                                run_metrics(c, champion) if champion else {}, tol, tpot_regression_pct)
    apply_promotion(c, candidate, decision, approved_by=approved_by)
    return decision


# ---- canary analysis (pure): one stage's challenger statistics against its SLOs and the champion ------


