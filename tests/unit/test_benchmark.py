"""Benchmark: percentile summaries, the greedy loop it times, and one scenario end to end on the CPU backend."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest
import torch

from npuflow.bench.measure import measure, run_scenario, summarize
from npuflow.bench.stage import build_report
from npuflow.core.config import BenchmarkConfig
from npuflow.runtime.backends import cpu
from npuflow.runtime.engine import Engine
from npuflow.runtime.loader import load_quantized
from npuflow.runtime.scheduler import generate

# ---------------------------------------------------------------------------------------------- summarize


def test_summarize_known_values() -> None:
    values = [float(v) for v in range(1, 101)]
    random.Random(0).shuffle(values)  # order does not matter
    s = summarize(values)
    assert s["p50"] == pytest.approx(50.5)  # linear interpolation between ranks
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert s["mean"] == pytest.approx(50.5)
    assert s["stdev_pct"] == pytest.approx(100 * statistics.stdev(range(1, 101)) / 50.5)


@pytest.mark.parametrize("values", [[7.5] * 10, [7.5]], ids=["constant", "single"])
def test_summarize_constant_values(values: list[float]) -> None:
    s = summarize(values)
    assert s["stdev_pct"] == 0.0
    assert s["p50"] == s["p90"] == s["p99"] == s["mean"] == 7.5


def test_summarize_tail_shows_in_p99_not_p50() -> None:
    s = summarize([10.0] * 99 + [1000.0])
    assert s["p50"] == pytest.approx(10.0)
    assert s["p99"] > 10.0 and s["stdev_pct"] > 100


# ---------------------------------------------------------------------------------------------- greedy loop


@pytest.mark.parametrize("n", [1, 6])
def test_engine_greedy_matches_hf_generate(tiny_random_llama, n: int) -> None:
    prompt = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))  # (B, T_in)
    tokens = generate(Engine(tiny_random_llama, max_len=8 + n, slots=2), prompt, n)
    assert tokens.shape == (2, n) and tokens.dtype == torch.long
    with torch.inference_mode():
        hf = tiny_random_llama.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n, min_new_tokens=n
        )
    # min_new_tokens forbids EOS in HF; this seed's continuation has none, so the loops must agree
    assert (tokens != tiny_random_llama.generation_config.eos_token_id).all()
    assert torch.equal(tokens, hf[:, prompt.shape[1] :])


# ---------------------------------------------------------------------------------------------- scenario


@pytest.fixture(scope="module")
def quantized_model(quantized_llama_dir: Path):
    return load_quantized(quantized_llama_dir, cpu, torch.float32)


def test_run_scenario(quantized_model) -> None:
    cfg = BenchmarkConfig(batch_size=2, input_len=8, output_len=3, warmup=0, iterations=2)
    scenario, energy = run_scenario(quantized_model, cpu, cfg, vocab_size=128)
    assert scenario.name == "bs2_in8_out3"
    assert (scenario.batch_size, scenario.input_len, scenario.output_len) == (2, 8, 3)
    assert scenario.iterations == 2
    for stats in (scenario.ttft_ms, scenario.tpot_ms):
        assert set(stats) == {"p50", "p90", "p99", "mean", "stdev_pct"}
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert scenario.e2e_ms_p50 > scenario.ttft_ms["p50"]  # e2e includes prefill and the decode steps
    assert scenario.decode_tokens_per_s == pytest.approx(2 * 1000 / scenario.tpot_ms["p50"])
    assert scenario.throughput_tokens_per_s == pytest.approx(2 * 3 * 1000 / scenario.e2e_ms_p50)
    assert energy is None if cpu.energy_joules() is None else energy >= 0


def test_run_scenario_keeps_going_for_min_seconds(quantized_model) -> None:
    cfg = BenchmarkConfig(batch_size=1, input_len=4, output_len=2, warmup=1, iterations=1, min_seconds=1.0)
    scenario, _ = run_scenario(quantized_model, cpu, cfg, vocab_size=128)
    assert scenario.iterations > 1  # one run of a 90k-parameter model takes milliseconds, even on a busy machine
    # roughly 1 s was spent timing (the mean, not the median: a busy machine adds a tail the median ignores)
    assert scenario.iterations * scenario.e2e_ms["mean"] >= 0.5 * 1000


@pytest.mark.parametrize(("limit", "flag"), [(1e-9, True), (1e9, False)])
def test_run_scenario_flags_unstable_tpot(quantized_model, limit: float, flag: bool) -> None:
    cfg = BenchmarkConfig(batch_size=1, input_len=4, output_len=4, warmup=0, iterations=3,
                          stability_stdev_pct_max=limit)
    scenario, _ = run_scenario(quantized_model, cpu, cfg, vocab_size=128)
    assert scenario.tpot_ms["stdev_pct"] > 0  # timings always differ a little
    assert scenario.unstable is flag


# ---------------------------------------------------------------------------------------------- roofline


def test_measure_every_scenario_then_roofline_on_measured_cpu_bandwidth(quantized_llama_dir: Path) -> None:
    cfg = BenchmarkConfig(scenarios=[{"batch_size": 1, "input_len": 8, "output_len": 4},
                                     {"batch_size": 2, "input_len": 16, "output_len": 4}],
                          warmup=1, iterations=2)
    result = measure(quantized_llama_dir, "cpu", "float32", cfg)
    assert [s["name"] for s in result["scenarios"]] == ["bs1_in8_out4", "bs2_in16_out4"]
    assert torch.tensor(result["greedy_tokens"]).shape == (1, 4)  # first scenario's prompt, output_len tokens
    assert result["kv_bytes_per_element"] == 4  # float32 cache
    size = sum(p.stat().st_size for p in quantized_llama_dir.glob("*.safetensors"))
    rep = build_report([result], quantized_llama_dir, "cpu", cpu.device_name(), cfg, size, uri="file:///x",
                       key="k")
    assert rep.roofline["bandwidth_gbs"] > 0 and "measured" in rep.roofline["source"]
    for s in rep.scenarios:
        r = s.roofline
        assert r is not None and r.mbu_pct is not None and 0 < r.mbu_pct < 100
        assert r.mfu_pct is None and "MFU not available" in r.note  # a CPU has no peak FLOPS figure
        # MBU = (weights + B x KV x mean context) / TPOT p50 / measured bandwidth
        read = result["weight_bytes"] + s.batch_size * 2 * 2 * 2 * 16 * 4 * (s.input_len + s.output_len / 2)
        peak = rep.roofline["bandwidth_gbs"] * 1e9  # bytes/s
        assert r.mbu_pct == pytest.approx(100 * read / (s.tpot_ms["p50"] / 1e3) / peak)
    assert rep.metrics["tpot_ms_p50"] == rep.scenarios[0].tpot_ms["p50"]
    assert rep.metrics["mbu_pct"] == rep.scenarios[0].roofline.mbu_pct
    assert rep.energy.startswith("not measured") or "J over" in rep.energy


def test_scenarios_longer_than_the_model_are_refused_before_any_work(quantized_llama_dir: Path) -> None:
    from npuflow.bench.stage import check_scenarios_fit
    from npuflow.core.errors import NpuflowError

    limit = json.loads((quantized_llama_dir / "config.json").read_text())["max_position_embeddings"]
    check_scenarios_fit(quantized_llama_dir, BenchmarkConfig(input_len=limit - 2, output_len=2))
    with pytest.raises(NpuflowError, match=rf"bs1_in{limit}_out2 need more than the model's {limit} positions"):
        check_scenarios_fit(quantized_llama_dir, BenchmarkConfig(input_len=limit, output_len=2))
