"""The model version's description: what a reviewer reads before approving (pure rendering)."""

from __future__ import annotations

from npuflow.core.artifacts import GateResult, ValidationReport
from npuflow.registry.client import ModelVersion, run_url, version_description

RUN = "0123456789abcdef0123456789abcdef"


def validation(kl: float = 0.001) -> ValidationReport:
    gates = {
        "ppl_delta_pct": GateResult(passed=True, value=0.25, threshold=1.0, op="<="),
        "top1_agreement": GateResult(passed=True, value=0.98, threshold=0.95, op=">="),
        "kl_divergence": GateResult(passed=kl <= 0.05, value=kl, threshold=0.05, op="<="),
    }
    return ValidationReport(uri="file:///s/v", key="models/m/validation/1", deployable_manifest_sha256="d" * 64,
                            eval_text_sha256="e" * 64, eval_tokens=4096,
                            metrics={"ppl_candidate": 12.3, "top1_agreement": 0.98, "kl_divergence": kl}, gates=gates)


BENCH = {"ttft_ms_p50": 10.0, "tpot_ms_p50": 4.0, "decode_tokens_per_s": 250.0, "peak_memory_mb": 900.0,
         "model_size_mb": 7.0}
CHAMPION = ModelVersion(name="m", version="3", aliases=["champion"], tags={}, run_id="r3")


def test_gates_each_with_value_limit_and_result():
    text = version_description(validation(kl=0.2), None, None, None, RUN, None)
    assert "**Validation gates FAILED**" in text
    assert "| top1_agreement | 0.98 | >= 0.95 | pass |" in text
    assert "| kl_divergence | 0.2 | <= 0.05 | **FAIL** |" in text
    assert "not run (a version whose gates failed is not benchmarked)" in text
    assert f"MLflow run: `{RUN}`" in text and "Report:" not in text  # no benchmark, no report


def test_benchmark_deltas_against_the_champion_say_which_way_is_better():
    theirs = {"ttft_ms_p50": 10.0, "tpot_ms_p50": 5.0, "decode_tokens_per_s": 200.0, "peak_memory_mb": 800.0}
    text = version_description(validation(), BENCH, CHAMPION, theirs, RUN,
                               "s3://b/mlflow/1/r/artifacts/reports/report.html")
    assert "**Validation gates passed**" in text
    assert "**Benchmark against champion v3**" in text
    assert "| TPOT p50 (ms) | 4 | 5 | -20.0% (better) |" in text
    assert "| decode tokens/s | 250 | 200 | +25.0% (better) |" in text
    assert "| peak memory (MB) | 900 | 800 | +12.5% (worse) |" in text
    assert "| TTFT p50 (ms) | 10 | 10 | +0.0% (same) |" in text
    assert "| model size (MB) | 7 | n/a | not measured on the champion |" in text
    assert f"`runs:/{RUN}/reports/report.html` (s3://b/mlflow/1/r/artifacts/reports/report.html)" in text


def test_first_version_says_there_is_no_champion():
    text = version_description(validation(), BENCH, None, None, RUN, "file:///a/reports/report.html")
    assert "no champion" in text and "| TPOT p50 (ms) | 4 |" in text and "champion v" not in text


def test_run_link_only_for_a_tracking_server():
    assert run_url("sqlite:////x/mlflow.db", "1", RUN) is None
    url = run_url("http://mlflow:5000/", "7", RUN)
    assert url == f"http://mlflow:5000/#/experiments/7/runs/{RUN}"
    assert f"({url})" in version_description(validation(), None, None, None, RUN, None, url)
