"""The one generation loop (static KV cache, compiled decode, sampling, stop) on the trained demo model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from npuflow.core.config import QuantizationConfig
from npuflow.quant.streaming import quantize_dir
from npuflow.runtime.backends import cpu
from npuflow.runtime.engine import SEED_MAX, Engine, SamplingParams, sample
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
    expected = _hf_loop(model, prompt, 24)
    assert torch.equal(Engine(model, max_len=128).generate(prompt, 24), expected)
    assert torch.equal(Engine(model, max_len=128, cache="dynamic").generate(prompt, 24), expected)


@torch.inference_mode()
def _hf_loop(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding written out with HF's DynamicCache: the reference the engine must reproduce."""
    out = model(prompt, use_cache=True)
    tokens = [out.logits[:, -1:].argmax(-1)]
    for _ in range(n - 1):
        out = model(tokens[-1], cache=out.cache, use_cache=True)
        tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1)


def test_compiled_decode_matches_its_eager_reference_token_for_token(demo_w8a16: Path, prompt) -> None:
    model = load_quantized(demo_w8a16, cpu, torch.bfloat16)  # the fast path: bf16 + aten int8 kernel
    eager = Engine(model, max_len=128).generate(prompt, 32)
    compiled = Engine(model, max_len=128, compile=True).generate(prompt, 32)
    assert torch.equal(compiled, eager)


def test_engine_refuses_to_run_past_its_cache(demo_w8a16: Path, prompt) -> None:
    engine = Engine(load_quantized(demo_w8a16, cpu, torch.float32), max_len=prompt.shape[1] + 2)
    tok = engine.prefill(prompt).argmax(-1, keepdim=True)
    tok = engine.decode(engine.decode(tok).argmax(-1, keepdim=True)).argmax(-1, keepdim=True)
    with pytest.raises(ValueError, match="cache holds"):
        engine.decode(tok)
    with pytest.raises(ValueError, match="does not fit"):
        Engine(engine.model, max_len=4).prefill(prompt)


def test_stream_greedy_is_generate_and_stops_at_max_tokens(demo_w8a16: Path, prompt) -> None:
    engine = Engine(load_quantized(demo_w8a16, cpu, torch.float32), max_len=128)
    expected = engine.generate(prompt, 12)[0].tolist()
    assert list(engine.stream(prompt[0].tolist(), SamplingParams(max_tokens=12))) == expected


def test_stream_ends_at_a_stop_token_without_emitting_it(demo_w8a16: Path, prompt) -> None:
    engine = Engine(load_quantized(demo_w8a16, cpu, torch.float32), max_len=128)
    greedy = engine.generate(prompt, 12)[0].tolist()
    stop = greedy[5]
    got = list(engine.stream(prompt[0].tolist(), SamplingParams(max_tokens=12, stop_token_ids=frozenset({stop}))))
    assert got == greedy[: greedy.index(stop)]


def test_seeded_sampling_repeats_and_other_seeds_differ(demo_w8a16: Path, prompt) -> None:
    engine = Engine(load_quantized(demo_w8a16, cpu, torch.float32), max_len=128)
    ids = prompt[0].tolist()

    def run(seed: int) -> list[int]:
        return list(engine.stream(ids, SamplingParams(max_tokens=24, temperature=1.5, seed=seed)))

    assert run(7) == run(7)
    assert len({tuple(run(s)) for s in range(4)}) > 1  # a temperature of 1.5 over 24 tokens: not all equal


def test_tiny_top_p_is_greedy() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6, seed=0)
    assert all(int(sample(logits, params, params.generator())[0]) == 1 for _ in range(20))


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(max_tokens=1, temperature=-1), dict(max_tokens=1, top_p=0),
                                 dict(max_tokens=1, seed=SEED_MAX + 1), dict(max_tokens=1, seed=-1)])
def test_sampling_params_refuse_what_the_generator_cannot_do(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_stream_refuses_a_prompt_that_does_not_fit(demo_w8a16: Path, prompt) -> None:
    engine = Engine(load_quantized(demo_w8a16, cpu, torch.float32), max_len=prompt.shape[1] + 4)
    with pytest.raises(ValueError, match="exceeds"):
        next(engine.stream(prompt[0].tolist(), SamplingParams(max_tokens=5)))
