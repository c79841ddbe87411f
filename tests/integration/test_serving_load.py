"""The benchmark's serving scenario: `npuflow benchmark --serve-concurrency` serves the model with
`npuflow serve --model` and loads it with vLLM's own `vllm bench serve` (from the vLLM environment)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npuflow.bench.stage import check_load_tool
from npuflow.core.config import BenchmarkConfig
from npuflow.core.errors import NpuflowError
from tests.integration.test_cli import REPO, npuflow

pytestmark = pytest.mark.integration
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"


@pytest.mark.skipif(not VLLM_PY.is_file(), reason="the vLLM environment (.venv-vllm) is not installed: `make vllm`")
def test_benchmark_serves_the_model_and_sweeps_concurrency_with_vllm_bench(tiny_model_dir: Path, tmp_path: Path):
    q = tmp_path / "q"
    assert npuflow("quantize", str(tiny_model_dir), "--output", str(q), cwd=tmp_path).returncode == 0
    out, report = tmp_path / "bench.json", tmp_path / "report"
    proc = npuflow("benchmark", str(q), "--eager", "--input-len", "16", "--output-len", "8", "--warmup", "1",
                   "--iterations", "1", "--serve-concurrency", "1,4", "--output", str(out), "--report", str(report),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    levels = {lv["concurrency"]: lv for lv in data["serving"]}
    assert set(levels) == {1, 4}
    for c, lv in levels.items():
        assert lv["completed"] == lv["prompts"] == max(8, 2 * c) and lv["failed"] == 0
        assert lv["output_tokens_per_s"] > 0 and 0 < lv["ttft_ms"]["p50"] <= lv["ttft_ms"]["p99"]
        assert lv["itl_ms"]["p50"] > 0
    assert data["serving_method"]["server"].startswith("npuflow serve --model")
    assert data["metrics"]["serve_output_tokens_per_s.c4"] == levels[4]["output_tokens_per_s"]
    assert "## Serving under load (ms)" in (report / "report.md").read_text()
    assert (report / "serving_load.png").is_file()


def test_a_serving_scenario_without_its_load_tool_fails_before_any_work(tmp_path: Path) -> None:
    cfg = BenchmarkConfig(serving_load={"python": str(tmp_path / "no-venv" / "bin" / "python")})
    with pytest.raises(NpuflowError, match=r"run `make vllm`"):
        check_load_tool(cfg)


@pytest.mark.skipif(not VLLM_PY.is_file(), reason="the vLLM environment (.venv-vllm) is not installed: `make vllm`")
def test_a_tensor_parallel_benchmark_serves_the_model_on_the_same_ranks(tiny_model_dir: Path, tmp_path: Path):
    """Measure the path users run: the serving scenario of a tp 2 benchmark is `npuflow serve --model --tp 2`
    (npuflow's engine on two ranks behind the router), not a single-device server."""
    q = tmp_path / "q"
    assert npuflow("quantize", str(tiny_model_dir), "--output", str(q), cwd=tmp_path).returncode == 0
    out = tmp_path / "bench.json"
    proc = npuflow("benchmark", str(q), "--eager", "--mode", "tensor-parallel", "--tp", "2", "--input-len", "16",
                   "--output-len", "8", "--warmup", "1", "--iterations", "1", "--serve-concurrency", "2",
                   "--output", str(out), cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "--tp 2 --pp 1" in data["serving_method"]["server"]
    (lv,) = data["serving"]
    assert lv["completed"] == lv["prompts"] == 8 and lv["failed"] == 0 and lv["output_tokens_per_s"] > 0
