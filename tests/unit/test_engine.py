"""The generation engine (static KV cache, compiled decode) on the trained demo model, quantized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from npuflow.bench.measure import greedy_generate
from npuflow.core.config import QuantizationConfig
from npuflow.quant.streaming import quantize_dir
from npuflow.runtime.backends import cpu
from npuflow.runtime.engine import Engine
from npuflow.runtime.loader import load_quantized, load_tokenizer


@pytest.fixture(scope="module")
def demo_w8a16(tiny_model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "w8a16"
    out.mkdir()
    quantize_dir(tiny_model_dir, out, QuantizationConfig())
    return out


@pytest.fixture(scope="module")
def prompt(tiny_model_dir: Path) -> torch.Tensor:
    tok = load_tokenizer(tiny_model_dir)
    return torch.tensor([tok("the cat sees the dog . what color is the apple ?")["input_ids"]])  # (1, T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_engine_matches_hf_dynamic_cache(demo_w8a16: Path, prompt, dtype) -> None:
    model = load_quantized(demo_w8a16, cpu, dtype)
    expected = greedy_generate(model, prompt, 24)  # HF's DynamicCache
    assert torch.equal(Engine(model, max_len=128).generate(prompt, 24), expected)


def test_compiled_decode_matches_its_eager_reference_token_for_token(demo_w8a16: Path, prompt) -> None:
    model = load_quantized(demo_w8a16, cpu, torch.bfloat16)  # the fast path: bf16 + aten int8 kernel
    eager = Engine(model, max_len=128).generate(prompt, 32)
    compiled = Engine(model, max_len=128, compile=True).generate(prompt, 32)
    assert torch.equal(compiled, eager)


def test_engine_refuses_to_run_past_its_cache(demo_w8a16: Path, prompt) -> None:
    engine = Engine(load_quantized(demo_w8a16, cpu, torch.float32), max_len=prompt.shape[1] + 2)
    tok = engine.prefill(prompt)
    tok = engine.decode(engine.decode(tok))
    with pytest.raises(ValueError, match="cache holds"):
        engine.decode(tok)
    with pytest.raises(ValueError, match="does not fit"):
        Engine(engine.model, max_len=4).prefill(prompt)
