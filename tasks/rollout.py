"""Tasks: one rollout stage against the serving process, rollback, approval record and promotion."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict

from npuflow.core.config import StageConfig
from npuflow.core.errors import NpuflowError
from npuflow.core.locks import model_line_lock
from npuflow.core.names import Alias, Tag
from npuflow.core.settings import Settings
from npuflow.core.store import open_store
from npuflow.registry import approval
from npuflow.registry import client as registry
from npuflow.registry.promotion import PromotionDecision, apply_promotion
from npuflow.serving import canary
from npuflow.serving.analysis import StageVerdict, analyze_stage
from npuflow.serving.promstats import VersionStats


class StageRecord(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    weight: float  # challenger's traffic share, %
    verdict: StageVerdict
    load: canary.LoadSummary
    challenger: VersionStats  # this stage's interval
    champion: VersionStats  # this stage's interval


def _client():
    return registry.client(Settings().resolved_tracking_uri)


@task(name="resolve-versions", cache_policy=NONE)
def resolve_versions_task(name: str, version: str | None = None) -> tuple[registry.ModelVersion,
                                                                         registry.ModelVersion]:
    """The candidate (challenger) and the champion; a rollout needs both, and two different versions, and
    (when `version` is given: the release's) the candidate must be that version.

    A rolled-back candidate is refused. This rollout attempt is recorded on the candidate (its tag
    `rollout_attempt`, also in the returned version's tags) and any earlier approval is voided."""
    from prefect.runtime import flow_run

    c = _client()
    cand, champ = registry.by_alias(c, name, Alias.CANDIDATE), registry.by_alias(c, name, Alias.CHAMPION)
    if cand is None or champ is None:
        raise NpuflowError(f"{name}: a rollout needs a `candidate` and a `champion` alias; "
                           f"have {sorted(registry.aliases(c, name))}")
    if cand.version == champ.version:
        raise NpuflowError(f"{name}: the candidate (version {cand.version}) already is the champion")
    if version is not None and cand.version != version:
        raise NpuflowError(f"{name}: this release registered version {version} but `candidate` now points at "
                           f"version {cand.version} (another release moved it); not rolling out someone "
                           "else's version: re-run the release, or `npuflow rollout` that version explicitly")
    approval.refuse_rolled_back(cand)
    cand = approval.begin_attempt(c, cand, approval.new_attempt_id(flow_run.get_id()))
    get_run_logger().info("rollout attempt %s for %s v%s (an approval counts for this attempt only: tag "
                          "approved=true on the version, or the typed form)", cand.tags[approval.ROLLOUT_ATTEMPT],
                          name, cand.version)
    return cand, champ


@task(name="rollout-stage", cache_policy=NONE)
def stage_task(url: str, name: str, stage: StageConfig, prompts: list[str], candidate: str, champion: str,
               max_tokens: int, concurrency: int, champion_baseline: VersionStats | None) -> StageRecord:
    """Route the stage's share to the challenger, drive bounded load, then judge the interval's /metrics."""
    log = get_run_logger()
    h = canary.health(url)
    served = {k: (h.get(k) or {}).get("version") for k in ("champion", "challenger")}
    if served != {"champion": champion, "challenger": candidate} or h["challenger"]["status"] != "serving":
        reason = (h.get("challenger") or {}).get("reason") or f"serving {served}"
        verdict = StageVerdict(result="fail", reasons=[f"{stage.name}: the server does not serve champion "
                                                       f"{champion} + challenger {candidate}: {reason}"])
        empty = canary.LoadSummary(sent=0, by_role={}, failed=0, elapsed_s=0.0)
        return StageRecord(name=stage.name, weight=stage.weight, verdict=verdict, load=empty,
                           challenger=VersionStats(version=candidate), champion=VersionStats(version=champion))
    canary.set_weights(url, 100 - stage.weight, stage.weight, lease_s=canary.lease_for(stage))
    before = canary.read_stats(url, name)
    t0 = time.monotonic()
    load = canary.run_load(url, name, prompts, stage, max_tokens, concurrency)
    after = canary.read_stats(url, name)
    elapsed = time.monotonic() - t0
    chal = after.get(candidate, VersionStats(version=candidate)).minus(before.get(candidate))
    champ = after.get(champion, VersionStats(version=champion)).minus(before.get(champion))
    baseline = champ if champ.requests > 0 else champion_baseline
    verdict = analyze_stage(stage, chal, baseline, elapsed)
    log.info("stage %s %g%%: %s (%s); load %s", stage.name, stage.weight, verdict.result,
             "; ".join(verdict.reasons), load.model_dump())
    return StageRecord(name=stage.name, weight=stage.weight, verdict=verdict, load=load, challenger=chal,
                       champion=champ)


@task(name="rollback", cache_policy=NONE)
def rollback_task(url: str, candidate: registry.ModelVersion, state: str, reason: str) -> None:
    """All traffic back to the champion at once, then the decision and its reason on the version.
    Aliases are not touched: the champion never stopped being the champion."""
    try:
        canary.set_weights(url, 100, 0)
    finally:
        registry.tag_version(_client(), candidate, {Tag.ROLLOUT: state, Tag.ROLLOUT_REASON: reason[:4900]})
    get_run_logger().warning("rollout %s: %s", state, reason)


@task(name="record-approval", cache_policy=NONE)
def record_approval_task(candidate: registry.ModelVersion, approved: bool, reviewer: str, comment: str) -> None:
    """The answer, bound to the attempt recorded on `candidate` by resolve_versions_task."""
    approval.record_approval(_client(), candidate, candidate.tags.get(approval.ROLLOUT_ATTEMPT, "unrecorded"),
                             approved, reviewer, comment)


@task(name="approved-in-registry", cache_policy=NONE)
def registry_approval_task(candidate: registry.ModelVersion) -> str | None:
    """The reviewer when someone set the version's tag `approved=true` during this rollout attempt, else
    None; an approval from an earlier attempt never counts (read fresh from the registry)."""
    attempt = candidate.tags.get(approval.ROLLOUT_ATTEMPT)
    if attempt is None:
        return None  # not begun by resolve_versions_task: nothing can be bound to it
    return approval.approval_for(_client(), candidate, attempt)


@task(name="promote-rollout", cache_policy=NONE)
def promote_rollout_task(url: str, candidate: registry.ModelVersion, champion: registry.ModelVersion,
                         reasons: list[str], approved_by: str) -> dict[str, str]:
    """champion -> candidate, previous -> old champion (tagged rollout=promoted); the server reloads."""
    decision = PromotionDecision(action="promote", reasons=reasons, candidate_version=candidate.version,
                                 champion_version=champion.version)
    c = _client()
    store = open_store(Settings().resolved_store_uri)
    with model_line_lock(store, candidate.name, f"rollout promotion of {candidate.name} v{candidate.version}"):
        apply_promotion(c, candidate, decision, approved_by=approved_by)  # aborts if the champion moved meanwhile
    canary.set_weights(url, 100, 0)
    canary.reload(url)
    return registry.aliases(c, candidate.name)
