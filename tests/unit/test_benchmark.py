"""Benchmark: percentile summaries, the greedy loop it times, and one scenario end to end on the CPU backend."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest
import torch

from npuflow.backends import cpu
from npuflow.benchmark import greedy_generate, run_scenario, summarize
from npuflow.config import BenchmarkConfig
from npuflow.runtime import load_quantized

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
def test_greedy_generate_matches_hf_generate(tiny_random_llama, n: int) -> None:
    prompt = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))  # (B, T_in)
    tokens = greedy_generate(tiny_random_llama, prompt, n)
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
    assert scenario.iterations * scenario.e2e_ms_p50 >= 0.5 * 1000  # roughly 1 s was spent timing
