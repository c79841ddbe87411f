"""Canary analysis (pure): the /metrics parser on real prometheus_client text, and stage verdicts."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from npuflow.core.config import RolloutConfig, SloConfig, StageConfig
from npuflow.serving.analysis import analyze_stage
from npuflow.serving.metrics import TPOT_BUCKETS, TTFT_BUCKETS
from npuflow.serving.promstats import VersionStats, parse_metrics

NAME = "tiny-llama"


def _exposition(per_version: dict[str, dict]) -> str:
    """Prometheus text written by prometheus_client with the serving process's metric names and buckets."""
    reg = CollectorRegistry()
    mv = ("model", "version")
    req = Counter("npuflow_serve_requests", "r", mv, registry=reg)
    err = Counter("npuflow_serve_errors", "e", (*mv, "type"), registry=reg)
    ttft = Histogram("npuflow_serve_ttft_seconds", "t", mv, buckets=TTFT_BUCKETS, registry=reg)
    tpot = Histogram("npuflow_serve_tpot_seconds", "p", mv, buckets=TPOT_BUCKETS, registry=reg)
    err.labels(NAME, "none", "invalid_request_error").inc(7)  # not routed to any version: ignored
    req.labels("other-model", "1").inc(99)  # another model: ignored
    for version, d in per_version.items():
        req.labels(NAME, version).inc(d["requests"])
        if d.get("errors"):
            err.labels(NAME, version, "server_error").inc(d["errors"])
        for v in d.get("ttft", ()):
            ttft.labels(NAME, version).observe(v)
        for v in d.get("tpot", ()):
            tpot.labels(NAME, version).observe(v)
    return generate_latest(reg).decode()


def test_parser_reads_counts_and_interpolates_p95_from_real_exposition():
    # 100 TTFT observations: 90 at 20 ms (bucket 10-25 ms), 10 at 80 ms (bucket 50-100 ms)
    text = _exposition({"2": {"requests": 100, "errors": 3, "ttft": [0.02] * 90 + [0.08] * 10,
                              "tpot": [0.003] * 50}})
    stats = parse_metrics(text, NAME)
    assert set(stats) == {"2"}
    s = stats["2"]
    assert (s.requests, s.errors, s.error_rate) == (100, 3, 0.03)
    assert s.ttft.count == 100 and s.tpot.count == 50
    # rank 95 lies in the 50-100 ms bucket holding ranks 91..100: 50 + 50 * (95 - 90) / 10 = 75 ms
    assert s.p95_ms("ttft") == pytest.approx(75.0)
    # every TPOT observation in the 2.5-5 ms bucket: 2.5 + 2.5 * 0.95 = 4.875 ms
    assert s.p95_ms("tpot") == pytest.approx(4.875)


def test_interval_statistics_subtract_a_snapshot_and_empty_histograms_have_no_p95():
    before = parse_metrics(_exposition({"1": {"requests": 10, "ttft": [0.5] * 10}}), NAME)["1"]
    after = parse_metrics(_exposition({"1": {"requests": 30, "errors": 2,
                                             "ttft": [0.5] * 10 + [0.002] * 20}}), NAME)["1"]
    delta = after.minus(before)
    assert (delta.requests, delta.errors, delta.ttft.count) == (20, 2, 20)
    assert delta.p95_ms("ttft") <= 2.5  # only the fast interval counts
    assert VersionStats(version="x").p95_ms("tpot") is None


def _stats(version: str, requests: int, ttft_s: float, tpot_s: float, errors: int = 0) -> VersionStats:
    text = _exposition({version: {"requests": requests, "errors": errors, "ttft": [ttft_s] * requests,
                                  "tpot": [tpot_s] * requests * 4}})
    return parse_metrics(text, NAME)[version]


STAGE = StageConfig(name="canary", weight=10, min_duration_s=5, min_requests=20,
                    slo=SloConfig(error_rate_max=0.05, ttft_regression_pct=20, tpot_regression_pct=20))
CHAMP = _stats("2", 200, 0.02, 0.003)


def test_healthy_challenger_passes():
    v = analyze_stage(STAGE, _stats("3", 40, 0.02, 0.003), CHAMP, elapsed_s=6)
    assert v.result == "pass", v.reasons


def test_too_few_requests_or_too_short_is_inconclusive_not_pass():
    assert analyze_stage(STAGE, _stats("3", 5, 0.02, 0.003), CHAMP, elapsed_s=60).result == "inconclusive"
    v = analyze_stage(STAGE, _stats("3", 40, 0.02, 0.003), CHAMP, elapsed_s=1)
    assert v.result == "inconclusive" and "too little data" in v.reasons[0]


def test_slow_challenger_fails_the_relative_slo_and_says_by_how_much():
    v = analyze_stage(STAGE, _stats("3", 40, 0.02, 0.02), CHAMP, elapsed_s=6)  # TPOT 3 ms -> 20 ms
    assert v.result == "fail"
    assert "tpot p95" in v.reasons[0] and "+20%" in v.reasons[0]


def test_failures_are_judged_even_on_little_data_and_absolute_limits_apply():
    v = analyze_stage(STAGE, _stats("3", 4, 0.02, 0.003, errors=2), CHAMP, elapsed_s=1)
    assert v.result == "fail" and "error rate 50.00%" in v.reasons[0]
    strict = STAGE.model_copy(update={"slo": SloConfig(ttft_ms_p95_max=5.0, ttft_regression_pct=None)})
    v = analyze_stage(strict, _stats("3", 40, 0.02, 0.003), CHAMP, elapsed_s=6)
    assert v.result == "fail" and "limit 5 ms" in v.reasons[0]


def test_without_champion_traffic_the_relative_check_is_skipped_with_a_note():
    v = analyze_stage(STAGE, _stats("3", 40, 0.02, 0.02), VersionStats(version="2"), elapsed_s=6)
    assert v.result == "pass"
    assert any("relative limit not checked" in r for r in v.reasons)


@pytest.mark.parametrize("bad", [
    {"stages": []},
    {"stages": [{"name": "full", "weight": 100}, {"name": "canary", "weight": 10}]},
    {"stages": [{"name": "shadow", "weight": 5}]},
    {"stages": [{"name": "canary", "weight": 10, "min_duration_s": 10, "max_duration_s": 5}]},
])
def test_rollout_config_rejects_inconsistent_stages(bad):
    with pytest.raises(ValueError):
        RolloutConfig.model_validate(bad)
