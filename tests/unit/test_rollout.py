"""Promotion decision (pure): candidate vs champion under the config's tolerances, with its reasons."""

from __future__ import annotations

import pytest

from npuflow.core.config import PromotionConfig
from npuflow.core.names import RolloutState, Tag
from npuflow.registry.client import ModelVersion
from npuflow.registry.promotion import decide_promotion

TOL = PromotionConfig(ppl_regression_pct=1.0, top1_drop_max=0.01)
TPOT_PCT = 25.0  # benchmark.tpot_regression_pct: the report's regression gate
CHAMP_METRICS = {"ppl_candidate": 10.0, "top1_agreement": 0.98, "tpot_ms_p50": 20.0}


def _version(version: str, gates: str | None = "passed", aliases: tuple[str, ...] = ()) -> ModelVersion:
    tags = {"gates": gates, "artifact_sha256": f"sha-{version}"} if gates else {}
    return ModelVersion(name="tiny-llama", version=version, aliases=list(aliases), tags=tags, run_id=f"run-{version}")


CANDIDATE = _version("3", aliases=("candidate",))
CHAMPION = _version("2", aliases=("champion",))


def _decide(candidate_metrics: dict[str, float], champion: ModelVersion | None = CHAMPION, champion_metrics=None):
    return decide_promotion(
        CANDIDATE, candidate_metrics, champion, CHAMP_METRICS if champion_metrics is None else champion_metrics, TOL,
        TPOT_PCT,
    )


@pytest.mark.parametrize("gates", ["failed", None])
def test_gates_not_passed_keeps_champion(gates: str | None) -> None:
    candidate = _version("3", gates=gates)
    for champion in (CHAMPION, None):  # even with no champion to keep
        d = decide_promotion(candidate, dict(CHAMP_METRICS), champion, CHAMP_METRICS, TOL, TPOT_PCT)
        assert d.action == "keep_champion" and not d.promote
        assert "gates failed" in d.reasons[0]
        assert d.candidate_version == "3"


def test_no_champion_promotes() -> None:
    d = _decide({"ppl_candidate": 99.0}, champion=None, champion_metrics={})
    assert d.action == "promote" and d.promote
    assert d.champion_version is None
    assert "no champion yet" in d.reasons[0]


def test_same_version_is_already_champion() -> None:
    d = decide_promotion(CHAMPION, CHAMP_METRICS, CHAMPION, CHAMP_METRICS, TOL, TPOT_PCT)
    assert d.action == "already_champion" and not d.promote
    assert d.reasons == ["version 2 is already the champion"]


def test_worse_ppl_beyond_tolerance_keeps_champion() -> None:
    d = _decide({**CHAMP_METRICS, "ppl_candidate": 10.2})  # +2% > 1%
    assert d.action == "keep_champion"
    assert d.champion_version == "2"
    assert "worse than champion v2 beyond tolerance" in d.reasons[0]
    assert "ppl_candidate: 10.2 vs champion v2 10 (+2.00%, allowed +1%)" in d.reasons[0]
    assert "tpot_ms_p50" not in d.reasons[0]  # only the metrics that are worse are blamed


def test_worse_ppl_within_tolerance_promotes() -> None:
    d = _decide({**CHAMP_METRICS, "ppl_candidate": 10.05})  # +0.5% <= 1%
    assert d.action == "promote" and d.promote
    assert "not worse than champion v2 beyond tolerance" in d.reasons[0]


def test_better_everywhere_promotes() -> None:
    d = _decide({"ppl_candidate": 9.0, "top1_agreement": 0.99, "tpot_ms_p50": 10.0})
    assert d.action == "promote"


def test_tpot_regression_keeps_champion() -> None:
    d = _decide({**CHAMP_METRICS, "tpot_ms_p50": 26.0})  # +30% > 25%
    assert d.action == "keep_champion"
    assert "tpot_ms_p50: 26 ms vs champion 20 ms (+30.0%, limit +25%)" in d.reasons[0]


def test_tpot_exactly_at_the_limit_promotes() -> None:
    d = _decide({**CHAMP_METRICS, "tpot_ms_p50": 25.0})  # +25% == 25%: not beyond tolerance
    assert d.action == "promote"


def test_top1_drop_is_absolute() -> None:
    assert _decide({**CHAMP_METRICS, "top1_agreement": 0.975}).action == "promote"  # -0.005
    d = _decide({**CHAMP_METRICS, "top1_agreement": 0.96})  # -0.02 > 0.01
    assert d.action == "keep_champion"
    assert "top1_agreement" in d.reasons[0]


def test_several_regressions_are_all_named() -> None:
    d = _decide({"ppl_candidate": 20.0, "top1_agreement": 0.5, "tpot_ms_p50": 100.0})
    assert d.action == "keep_champion"
    for metric in ("ppl_candidate", "top1_agreement", "tpot_ms_p50"):
        assert metric in d.reasons[0]


def test_an_unmeasured_candidate_speed_blocks_a_missing_champion_one_does_not() -> None:
    d = _decide({"ppl_candidate": 10.0, "top1_agreement": 0.98})  # no benchmark on the candidate
    assert d.action == "keep_champion"
    assert "candidate has no tpot_ms_p50: it was not benchmarked" in d.reasons[0]
    d = _decide(dict(CHAMP_METRICS), champion_metrics={"ppl_candidate": 10.0, "top1_agreement": 0.98})
    assert d.action == "promote"
    assert "no champion TPOT to compare against: the regression gate does not apply" in d.reasons


def test_every_scenario_both_measured_is_gated() -> None:
    champ = {**CHAMP_METRICS, "tpot_ms_p50.bs4_in64_out32": 30.0}
    d = _decide({**CHAMP_METRICS, "tpot_ms_p50.bs4_in64_out32": 40.0}, champion_metrics=champ)  # +33%
    assert d.action == "keep_champion" and "tpot_ms_p50.bs4_in64_out32" in d.reasons[0]


def test_promotion_config_points_to_the_one_tpot_tolerance() -> None:
    with pytest.raises(ValueError, match=r"moved to benchmark\.tpot_regression_pct"):
        PromotionConfig(tpot_regression_pct=5.0)


def test_missing_metric_does_not_hide_a_regression() -> None:
    d = _decide({"ppl_candidate": 11.0})  # tpot and top1 missing, ppl +10%
    assert d.action == "keep_champion"
    assert "ppl_candidate" in d.reasons[0]
    assert any("top1_agreement: not compared" in r for r in d.reasons[1:])


def test_stricter_tolerance_changes_the_decision() -> None:
    metrics = {**CHAMP_METRICS, "ppl_candidate": 10.05}
    assert _decide(metrics).action == "promote"
    strict = PromotionConfig(ppl_regression_pct=0.1, top1_drop_max=0.01)
    assert decide_promotion(CANDIDATE, metrics, CHAMPION, CHAMP_METRICS, strict, TPOT_PCT).action == "keep_champion"
    assert decide_promotion(CANDIDATE, {**metrics, "tpot_ms_p50": 22.0}, CHAMPION, CHAMP_METRICS, TOL,
                            5.0).action == "keep_champion"  # +10% TPOT > +5%


def test_nan_metric_is_worse_than_any_champion() -> None:
    d = _decide({**CHAMP_METRICS, "ppl_candidate": float("nan")})
    assert d.action == "keep_champion" and "ppl_candidate: nan" in d.reasons[0]


def test_a_rolled_back_version_is_never_promoted_again() -> None:
    rolled = ModelVersion(name="tiny-llama", version="3", aliases=[], run_id="run-3",
                          tags={"gates": "passed", "rollout": "rolled_back", "rollback_reason": "canary errors"})
    for champion in (CHAMPION, None):
        d = decide_promotion(rolled, dict(CHAMP_METRICS), champion, CHAMP_METRICS, TOL, TPOT_PCT)
        assert d.action == "keep_champion" and "was rolled back (canary errors)" in d.reasons[0]


def test_the_reason_a_failed_rollout_recorded_is_the_one_promotion_quotes() -> None:
    """The rollout writes Tag.ROLLOUT_REASON; promotion reads the same key (it once read another one)."""
    rolled = ModelVersion(name="tiny-llama", version="4", aliases=[], run_id="run-4",
                          tags={Tag.GATES: "passed", Tag.ROLLOUT: RolloutState.ROLLED_BACK,
                                Tag.ROLLOUT_REASON: "canary 10%: error rate 12%"})
    d = decide_promotion(rolled, dict(CHAMP_METRICS), CHAMPION, CHAMP_METRICS, TOL, TPOT_PCT)
    assert "was rolled back (canary 10%: error rate 12%)" in d.reasons[0]


def test_rollout_strategy_leaves_a_passing_candidate_for_the_staged_rollout() -> None:
    staged = PromotionConfig(ppl_regression_pct=1.0, top1_drop_max=0.01, strategy="rollout")
    d = decide_promotion(CANDIDATE, dict(CHAMP_METRICS), CHAMPION, CHAMP_METRICS, staged, TPOT_PCT)
    assert d.action == "rollout" and not d.promote and "until the staged rollout passes" in d.reasons[0]
    worse = decide_promotion(CANDIDATE, {**CHAMP_METRICS, "ppl_candidate": 11.0}, CHAMPION, CHAMP_METRICS, staged,
                             TPOT_PCT)
    assert worse.action == "keep_champion"  # the tolerances still decide first
    first = decide_promotion(CANDIDATE, dict(CHAMP_METRICS), None, {}, staged, TPOT_PCT)
    assert first.action == "promote"  # no champion to stage against


# ---- approval bound to its rollout attempt; a rolled-back version is not rolled out again (issue 13 hole 11)


@pytest.fixture
def registry_line(npuflow_home, prefect_harness):
    """champion v1, candidate v2 in the embedded sqlite MLflow (NPUFLOW_HOME)."""
    from npuflow.core.settings import Settings
    from npuflow.registry import client as registry

    c = registry.client(Settings().resolved_tracking_uri)
    c.create_registered_model("line")
    for _ in (1, 2):
        c.create_model_version("line", source="file:///x", tags={"gates": "passed", "rollout": "registered"})
    c.set_registered_model_alias("line", "champion", "1")
    c.set_registered_model_alias("line", "candidate", "2")
    return c


def test_an_approval_from_an_earlier_attempt_does_not_approve_the_next(registry_line) -> None:
    """Before the fix the second attempt found approved=true (from the first) and went to full at once."""
    from npuflow.tasks.rollout import record_approval_task, registry_approval_task, resolve_versions_task

    first, _ = resolve_versions_task("line")
    assert registry_approval_task(first) is None
    record_approval_task(first, True, "ada", "ok for attempt 1")
    assert registry_approval_task(first) == "ada"  # counts for the attempt it was given in
    second, _ = resolve_versions_task("line")  # e.g. the first attempt failed later and is re-run
    assert registry_approval_task(second) is None
    tags = registry_line.get_model_version("line", "2").tags
    assert tags["approved"] == "pending" and "true by ada" in tags["previous_approval"]
    assert registry_approval_task(first) is None  # the first attempt's approval no longer counts either


def test_a_reviewer_tag_set_during_the_attempt_counts(registry_line) -> None:
    from npuflow.tasks.rollout import registry_approval_task, resolve_versions_task

    cand, _ = resolve_versions_task("line")
    registry_line.set_model_version_tag("line", "2", "approved", "true")  # the MLflow UI, during the attempt
    registry_line.set_model_version_tag("line", "2", "approved_by", "grace")
    assert registry_approval_task(cand) == "grace"


def test_rollout_refuses_a_rolled_back_version_and_says_how_to_re_release(registry_line) -> None:
    from npuflow.tasks.rollout import resolve_versions_task

    from npuflow.core.errors import NpuflowError

    registry_line.set_model_version_tag("line", "2", "rollout", "rolled_back")
    registry_line.set_model_version_tag("line", "2", "rollout_reason", "tpot p95 +80%")
    with pytest.raises(NpuflowError, match=r"version 2 was rolled back \(tpot p95 \+80%\).*npuflow run CONFIG"):
        resolve_versions_task("line")
    assert "rollout_attempt" not in registry_line.get_model_version("line", "2").tags
