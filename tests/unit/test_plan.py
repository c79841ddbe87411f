"""Capacity planning pinned against hand calculations (shapes from shared/DESIGN.md)."""

from __future__ import annotations

import json

import pytest

from npuflow.bench.plan import (
    MODELS,
    cheapest,
    flops_per_token,
    kv_bytes_per_token,
    model_shape,
    plan,
    weight_bytes,
)
from npuflow.core.errors import ConfigError


def test_llama_2_parameter_counts_match_the_published_sizes() -> None:
    # 7B: 32 x (4 x 4096^2 + 3 x 4096 x 11008) + 2 x 32000 x 4096 + norms = 6.738B
    assert MODELS["llama-2-7b"].params == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 2 * 32000 * 4096 + 65 * 4096
    assert MODELS["llama-2-7b"].params / 1e9 == pytest.approx(6.738, abs=0.001)
    assert MODELS["llama-2-13b"].params / 1e9 == pytest.approx(13.016, abs=0.001)
    # 70B with GQA: k/v are 8192 x 1024
    per_layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672
    assert MODELS["llama-2-70b"].params == 80 * per_layer + 2 * 32000 * 8192 + 161 * 8192


def test_70b_fp16_is_140_gb_and_needs_three_64_gb_devices() -> None:
    p = plan("llama-2-70b", "ascend-910b2", "fp16")
    assert p.weights_gb == pytest.approx(140, rel=0.02)
    assert p.min_devices == 3  # 137.95 GB / 64 GB = 2.16 -> 3, before any KV cache
    assert not p.modes["single"].fits


def test_7b_w8a16_is_about_7_gb() -> None:
    p = plan("llama-2-7b", "ascend-910b2", "w8a16")
    # 6.476B linear weights at 1 B + per-row fp16 scales + 0.262B embedding/head params at 2 B
    assert p.weights_gb == pytest.approx(7.0, abs=0.1)
    assert p.min_devices == 1
    # w4a16 g128: 0.5 B + 4 B of scale and zero per 128 weights, embedding/head still 2 B
    assert weight_bytes(MODELS["llama-2-7b"], "w4a16") / 1e9 == pytest.approx(6.476 * (0.5 + 4 / 128) + 0.524, abs=0.01)


def test_kv_cache_per_token() -> None:
    assert kv_bytes_per_token(MODELS["llama-2-7b"]) == 2 * 32 * 32 * 128 * 2  # 512 KiB: no GQA
    assert kv_bytes_per_token(MODELS["llama-2-70b"]) == 2 * 80 * 8 * 128 * 2  # 320 KiB: 8 KV heads
    p = plan("llama-2-70b", "ascend-910b2", "fp16", context=4096)
    assert p.kv_cache_gb_per_sequence == pytest.approx(327680 * 4096 / 1e9)


def test_max_batch_at_context_on_the_minimum_devices() -> None:
    p = plan("llama-2-7b", "ascend-910b2", "fp16", context=4096)
    free = 64e9 * 0.9 - weight_bytes(MODELS["llama-2-7b"], "fp16")
    assert p.max_batch_at_context == int(free // (524288 * 4096))


def test_decode_bounds_per_mode_from_bandwidth() -> None:
    p = plan("llama-2-70b", "ascend-910b2", "fp16", context=4096, devices=8)
    read = weight_bytes(MODELS["llama-2-70b"], "fp16") + 327680 * 4096
    single = read / 1.6e12 * 1e3  # ms at 1.6 TB/s
    assert p.modes["single"].tpot_ms_bound == pytest.approx(single)
    # pipeline parallelism does not speed one sequence up; tensor parallelism divides the bytes by 8
    assert p.modes["pipeline-parallel"].tpot_ms_bound > single
    tp = p.modes["tensor-parallel"]
    assert tp.tpot_ms_bound == pytest.approx(single / 8 + tp.comm_ms)
    assert 0 < tp.comm_ms < single / 8  # communication matters but does not dominate on HCCS
    lo, hi = tp.tpot_ms_expected
    assert tp.tpot_ms_bound < lo < hi


def test_flops_per_token_is_two_per_parameter_plus_attention() -> None:
    m = MODELS["llama-2-7b"]
    no_ctx = flops_per_token(m, 0)
    assert no_ctx == pytest.approx(2 * (m.params - 32000 * 4096))  # the embedding lookup is not a matmul
    assert flops_per_token(m, 4096) - no_ctx == pytest.approx(4 * 32 * 4096 * 4096)


def test_cheapest_prefers_fewer_devices_then_higher_precision() -> None:
    c = cheapest("llama-2-7b", "ascend-910b2", tpot_target_ms=25.0)
    assert c == {"devices": 1, "mode": "single", "precision": "fp16", "tpot_ms_expected": pytest.approx(c["tpot_ms_expected"])}
    assert cheapest("llama-2-70b", "ascend-910b2", tpot_target_ms=0.01) is None


def test_any_hf_config_json(tmp_path) -> None:
    cfg = {"num_attention_heads": 32, "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
           "vocab_size": 32000, "num_key_value_heads": 32}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert model_shape(str(tmp_path)).params == MODELS["llama-2-7b"].params


def test_unknown_inputs_name_the_choices() -> None:
    with pytest.raises(ConfigError, match="llama-2-7b, llama-2-13b, llama-2-70b"):
        plan("gpt-5", "ascend-910b2")
    with pytest.raises(ConfigError, match="ascend-910b2"):
        plan("llama-2-7b", "tpu-v5")
