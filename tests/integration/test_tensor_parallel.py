"""Tensor parallelism as a user runs it: `npuflow benchmark --mode tensor-parallel --tp 2` on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from npuflow.bench.measure import make_prompt
from npuflow.bench.parallel import launch
from npuflow.core.config import BenchmarkConfig, QuantizationConfig
from npuflow.quant.streaming import quantize_dir
from npuflow.runtime.backends import cpu
from npuflow.runtime.engine import Engine
from npuflow.runtime.loader import load_quantized
from npuflow.runtime.scheduler import generate

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


# One OpenMP thread per process: the tensor-parallel ranks get one each on this 2-core machine anyway, and a
# 2-thread team stalls for ~0.3 s per decode step whenever other processes take the cores (measured).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def npuflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NPUFLOW_", "MLFLOW_"))}
    return subprocess.run([sys.executable, "-m", "npuflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**env, "PYTHONPATH": str(REPO), **ONE_THREAD})


@pytest.fixture(scope="module")
def demo_quantized(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo model in w8a16 (per channel) and w4a16 (groups of 32 and of 128 input channels)."""
    out = {}
    variants = (("w8a16", "w8a16", None), ("w4a16-g32", "w4a16", 32), ("w4a16-g128", "w4a16", 128))
    for name, scheme, group in variants:
        d = tmp_path_factory.mktemp(f"demo-{name}")
        quantize_dir(tiny_model_dir, d, QuantizationConfig(scheme=scheme, group_size=group))
        out[name] = d
    return out


def test_tp2_greedy_tokens_equal_single_device_and_report_shows_both_modes(demo_quantized, tmp_path):
    scenarios = tmp_path / "scenarios.yaml"
    scenarios.write_text("- {batch_size: 1, input_len: 64, output_len: 32}\n"
                         "- {batch_size: 4, input_len: 64, output_len: 32}\n")
    out, report = tmp_path / "bench.json", tmp_path / "report"
    proc = npuflow("benchmark", str(demo_quantized["w8a16"]), "--scenarios", str(scenarios), "--mode",
                   "tensor-parallel", "--tp", "2", "--warmup", "1", "--iterations", "3", "--report",
                   str(report), "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())

    # the same 32 greedy tokens, token for token, from 2 gloo ranks and from one process
    single, tp = data["greedy_tokens"]["single"], data["greedy_tokens"]["tensor-parallel"]
    assert len(single) == 1 and len(single[0]) == 32
    assert tp == single and data["greedy_tokens_match"] is True

    # DESIGN.md names at the top level, for the primary scenario of the mode asked for
    tp_primary = next(s for s in data["scenarios"] if s["mode"] == "tensor-parallel")
    assert tp_primary["name"] == "bs1_in64_out32" and tp_primary["devices"] == 2
    assert data["tpot_ms_p50"] == tp_primary["tpot_ms"]["p50"] > 0
    for name in ("ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p90", "decode_tokens_per_s",
                 "throughput_tokens_per_s", "peak_memory_mb", "model_size_mb", "mbu_pct"):
        assert data[name] > 0, name
    assert data["energy"].startswith("not measured") or " J over " in data["energy"]
    assert {"tpot_ms_p50.bs4_in64", "tpot_ms_p50.tp2_bs4_in64"} <= set(data["metrics"])
    assert sorted((s["mode"], s["batch_size"]) for s in data["scenarios"]) == [
        ("single", 1), ("single", 4), ("tensor-parallel", 1), ("tensor-parallel", 4)]

    md = (report / "report.md").read_text()
    for label in ("single bs1_in64_out32", "single bs4_in64_out32", "TP=2 bs1_in64_out32",
                  "TP=2 bs4_in64_out32"):
        assert f"| {label} |" in md
    assert "| tensor-parallel | 32 | identical |" in md
    assert (report / "throughput_vs_batch.png").stat().st_size > 0 and (report / "report.html").is_file()
    assert "greedy tokens, tensor-parallel vs single: identical" in proc.stdout


def test_tp2_splits_int4_groups_and_decodes_like_one_device(demo_quantized, monkeypatch):
    """Row-parallel 4-bit layers split along whole groups (scale and zero with them): same greedy tokens."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model_dir = demo_quantized["w4a16-g32"]
    cfg = BenchmarkConfig(batch_size=2, input_len=48, output_len=24, warmup=0, iterations=1,
                          mode="tensor-parallel", tp=2)
    result = launch(model_dir, "cpu", "float32", cfg, ranks=2, timeout_s=240)
    assert result["devices"] == 2 and result["dist_backend"] == "gloo"
    assert result["rank_weight_bytes"] < result["weight_bytes"]  # each rank: half of every decoder linear
    model = load_quantized(model_dir, cpu, torch.float32)
    prompt = make_prompt(cfg.resolved_scenarios[0], model.config.vocab_size, cpu.device())
    expected = generate(Engine(model, max_len=prompt.shape[1] + 24), prompt, 24)  # one device
    assert result["greedy_tokens"] == expected.tolist()


def test_tp_that_splits_int4_groups_fails_before_starting_ranks(demo_quantized, tmp_path):
    # o_proj has 128 inputs: 64 per rank is not a whole 128-wide group
    proc = npuflow("benchmark", str(demo_quantized["w4a16-g128"]), "--mode", "tensor-parallel", "--tp", "2",
                   "--no-single-baseline", "--iterations", "1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "do not split into whole int4 groups of 128; use a tp or group_size that does" in proc.stderr
    assert "torch.distributed" not in proc.stderr  # no rank was started


def test_pp2_as_a_user_runs_it_from_the_cli_equals_single_device(demo_quantized, tmp_path):
    """`npuflow benchmark --mode pipeline-parallel --pp 2`: two stages of contiguous layers, same tokens."""
    out = tmp_path / "bench.json"
    proc = npuflow("benchmark", str(demo_quantized["w8a16"]), "--mode", "pipeline-parallel", "--pp", "2",
                   "--input-len", "32", "--output-len", "16", "--warmup", "1", "--iterations", "2",
                   "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert (data["mode"], data["tp"], data["pp"]) == ("pipeline-parallel", 1, 2)
    assert data["greedy_tokens"]["pipeline-parallel"] == data["greedy_tokens"]["single"]
    assert data["greedy_tokens_match"] is True
    assert "greedy tokens, pipeline-parallel vs single: identical" in proc.stdout
