"""The nightly check's pure parts: the drift decision, and the store that hides earlier stage results."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from npuflow.core.artifacts import GateResult
from npuflow.core.config import PromotionConfig
from npuflow.core.store import LocalStore
from npuflow.registry.nightly import FreshResults, check_drift, stage_prefixes

TOL = PromotionConfig(ppl_regression_pct=1.0, top1_drop_max=0.01)
TPOT_PCT = 25.0
RECORDED = {"ppl_candidate": 10.0, "top1_agreement": 0.98, "tpot_ms_p50": 4.0}
PASSING = {"kl_divergence": GateResult(passed=True, value=0.01, threshold=0.05, op="<=")}


@pytest.mark.parametrize(
    ("measured", "drifted"),
    [
        ({"ppl_candidate": 10.1, "top1_agreement": 0.975, "tpot_ms_p50": 5.0}, set()),  # all at their limits
        ({"ppl_candidate": 10.11, "top1_agreement": 0.98, "tpot_ms_p50": 4.0}, {"ppl_candidate"}),
        ({"ppl_candidate": 10.0, "top1_agreement": 0.969, "tpot_ms_p50": 4.0}, {"top1_agreement"}),
        ({"ppl_candidate": 10.0, "top1_agreement": 0.98, "tpot_ms_p50": 5.01}, {"tpot_ms_p50"}),
        ({"ppl_candidate": 9.0, "top1_agreement": 0.99, "tpot_ms_p50": 1.0}, set()),  # better is never drift
        ({"ppl_candidate": math.nan, "top1_agreement": 0.98, "tpot_ms_p50": 4.0}, {"ppl_candidate"}),
    ],
)
def test_drift_past_the_promotion_tolerances(measured, drifted):
    v = check_drift(RECORDED, measured, PASSING, TOL, TPOT_PCT)
    assert v.passed == (not drifted)
    assert {k for k, c in v.checks.items() if not c.passed} == drifted
    assert all(any(m in f for m in drifted) for f in v.failures)


def test_a_gate_failing_now_is_drift_and_missing_numbers_are_said_not_compared():
    failing = {"kl_divergence": GateResult(passed=False, value=0.09, threshold=0.05, op="<=")}
    now = {"ppl_candidate": 10.0, "top1_agreement": 0.9, "tpot_ms_p50": 4.0}
    v = check_drift({"ppl_candidate": 10.0}, now, failing, TOL, TPOT_PCT)
    assert not v.passed
    assert v.failures == ["gate kl_divergence: 0.09, must be <= 0.05"]
    assert "top1_agreement: not compared (missing on recorded)" in v.notes
    assert "no champion TPOT to compare against: the regression gate does not apply" in v.notes


def test_a_speed_not_measured_now_is_drift():
    v = check_drift(RECORDED, {"ppl_candidate": 10.0, "top1_agreement": 0.98}, PASSING, TOL, TPOT_PCT)
    assert not v.passed and "has no tpot_ms_p50" in v.failures[0]


def test_fresh_results_reads_inputs_from_the_store_and_keeps_results_in_scratch(tmp_path: Path):
    base, scratch = LocalStore(tmp_path / "base"), LocalStore(tmp_path / "scratch")
    base.write_bytes("models/m/quantized/q1/manifest.json", b"{}")
    base.write_bytes("models/m/benchmark/b1/manifest.json", b"old")
    store = FreshResults(base, scratch, stage_prefixes("m"))
    assert store.exists("models/m/quantized/q1/manifest.json")  # inputs: the real store
    assert store.local_path("models/m/quantized/q1") == base.local_path("models/m/quantized/q1")
    assert not store.exists("models/m/benchmark/b1/manifest.json")  # an earlier result is not seen
    store.write_bytes("models/m/benchmark/b1/manifest.json", b"new")
    assert base.read_bytes("models/m/benchmark/b1/manifest.json") == b"old"  # nor overwritten
    assert scratch.read_bytes("models/m/benchmark/b1/manifest.json") == b"new"
    assert store.list_keys("models/m/validation/") == []
