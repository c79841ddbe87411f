"""Task: decide (pure function) and apply the promotion of the candidate to champion."""

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from npuflow.core.config import PromotionConfig
from npuflow.core.settings import Settings
from npuflow.registry import client as registry
from npuflow.registry.promotion import PromotionDecision, promote


@task(name="promote", cache_policy=NONE)
def promote_task(version: registry.ModelVersion, tol: PromotionConfig, tpot_regression_pct: float) -> PromotionDecision:
    """Move `champion` to the candidate when it is not worse beyond tolerance (quality: `tol`; speed: the
    benchmark's regression gate, TPOT p50 at most `tpot_regression_pct` % up); else record why not."""
    c = registry.client(Settings().resolved_tracking_uri)
    decision = promote(c, version, tol, tpot_regression_pct,
                       approved_by="npuflow promotion rules (no human approval configured)")
    get_run_logger().info("promote: %s: %s", decision.action, "; ".join(decision.reasons))
    return decision
