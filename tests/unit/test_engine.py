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
from npuflow.runtime.scheduler import Scheduler, generate, stream


@pytest.fixture(scope="module")
def prompt(tiny_model_dir: Path) -> torch.Tensor:
    tok = load_tokenizer(tiny_model_dir)
    return torch.tensor([tok("the cat sees the dog . what color is the apple ?")["input_ids"]])  # (1, T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_engine_matches_hf_dynamic_cache(demo_w8a16: Path, prompt, dtype) -> None:
    model = load_quantized(demo_w8a16, cpu, dtype)
    expected = _hf_loop(model, prompt, 24)
    assert torch.equal(generate(Engine(model, max_len=128), prompt, 24), expected)


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
    eager = generate(Engine(model, max_len=128), prompt, 32)
    compiled = generate(Engine(model, max_len=128, compile=True), prompt, 32)
    assert torch.equal(compiled, eager)


def test_engine_refuses_to_run_past_its_cache(demo_w8a16: Path, prompt) -> None:
    engine = Engine(load_quantized(demo_w8a16, cpu, torch.float32), max_len=prompt.shape[1] + 2)
    with pytest.raises(ValueError, match="cache holds"):
        engine.step(0, torch.zeros(1, 1, dtype=torch.long), torch.tensor([[prompt.shape[1] + 2]]))
    with pytest.raises(ValueError, match="exceeds the engine's"):
        Scheduler(engine).submit(prompt[0].tolist(), SamplingParams(max_tokens=3))


def test_stream_greedy_is_generate_and_stops_at_max_tokens(demo_w8a16: Path, prompt) -> None:
    engine = Engine(load_quantized(demo_w8a16, cpu, torch.float32), max_len=128)
    expected = generate(engine, prompt, 12)[0].tolist()
    assert list(stream(engine, prompt[0].tolist(), SamplingParams(max_tokens=12))) == expected


def test_stream_ends_at_a_stop_token_without_emitting_it(demo_w8a16: Path, prompt) -> None:
    engine = Engine(load_quantized(demo_w8a16, cpu, torch.float32), max_len=128)
    greedy = generate(engine, prompt, 12)[0].tolist()
    stop = greedy[5]
    got = list(stream(engine, prompt[0].tolist(), SamplingParams(max_tokens=12, stop_token_ids=frozenset({stop}))))
    assert got == greedy[: greedy.index(stop)]


def test_seeded_sampling_repeats_and_other_seeds_differ(demo_w8a16: Path, prompt) -> None:
    engine = Engine(load_quantized(demo_w8a16, cpu, torch.float32), max_len=128)
    ids = prompt[0].tolist()

    def run(seed: int) -> list[int]:
        return list(stream(engine, ids, SamplingParams(max_tokens=24, temperature=1.5, seed=seed)))

    assert run(7) == run(7)
    assert len({tuple(run(s)) for s in range(4)}) > 1  # a temperature of 1.5 over 24 tokens: not all equal


def test_tiny_top_p_is_greedy() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6, seed=0)
    assert all(int(sample(logits, params, params.generator())[0]) == 1 for _ in range(20))


def test_sampling_draws_each_token_at_its_probability_and_never_a_removed_one() -> None:
    """softmax(logits / T), top_p applied: 20,000 draws match the probabilities within 1.5 points, and a
    token that top_p removed (or of probability 0) is never drawn."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]))
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, seed=3)  # keeps 0.5, 0.3, 0.15
    gen = params.generator()
    draws = torch.cat([sample(logits.expand(1000, 5), params, gen) for _ in range(20)])
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    expect = torch.tensor([0.5, 0.3, 0.15, 0.0, 0.0]) / 0.95
    assert torch.allclose(freq, expect.double(), atol=0.015), freq
    assert freq[3] == 0 and freq[4] == 0


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(max_tokens=1, temperature=-1), dict(max_tokens=1, top_p=0),
                                 dict(max_tokens=1, seed=SEED_MAX + 1), dict(max_tokens=1, seed=-1)])
def test_sampling_params_refuse_what_the_generator_cannot_do(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_stream_refuses_a_prompt_that_does_not_fit(demo_w8a16: Path, prompt) -> None:
    engine = Engine(load_quantized(demo_w8a16, cpu, torch.float32), max_len=prompt.shape[1] + 4)
    with pytest.raises(ValueError, match="exceeds"):
        next(stream(engine, prompt[0].tolist(), SamplingParams(max_tokens=5)))


def test_sequences_joining_at_any_step_decode_as_they_would_alone(demo_w8a16: Path, tiny_model_dir: Path) -> None:
    """Continuous batching: prompts of different lengths arrive while others decode, prefill in chunks,
    finish at different steps; each sequence's greedy tokens equal its tokens generated alone."""
    model = load_quantized(demo_w8a16, cpu, torch.float32)
    tok = load_tokenizer(tiny_model_dir)
    texts = ["the cat sees the dog .", "what color is the apple ? the apple is", "anna has a red ball and",
             "the bird sings in the garden on monday . the", "two dogs"]
    alone = [list(stream(Engine(model, max_len=128), tok(t)["input_ids"], SamplingParams(max_tokens=6 + 3 * i)))
             for i, t in enumerate(texts)]
    sched = Scheduler(Engine(model, max_len=128, slots=3), prefill_chunk=4)
    seqs = []
    for i, t in enumerate(texts):
        seqs.append(sched.submit(tok(t)["input_ids"], SamplingParams(max_tokens=6 + 3 * i)))
        sched.step()  # each arrives while the earlier ones are running (3 slots: the last ones wait)
    sched.run_until_done()
    assert [s.output_ids for s in seqs] == alone
    assert all(s.finish_reason in ("length", "stop") for s in seqs) and not sched.running


def test_a_cancelled_sequence_frees_its_slot_at_the_next_step(demo_w8a16: Path, prompt) -> None:
    sched = Scheduler(Engine(load_quantized(demo_w8a16, cpu, torch.float32), max_len=128, slots=1))
    first = sched.submit(prompt[0].tolist(), SamplingParams(max_tokens=50))
    second = sched.submit(prompt[0].tolist(), SamplingParams(max_tokens=3))
    sched.step()
    sched.step()
    assert second.slot is None and first.slot == 0  # one slot: the second waits
    first.cancelled = True
    sched.step()
    assert first.finish_reason == "cancelled" and second.slot == 0
    sched.run_until_done()
    assert len(second.output_ids) == 3


def test_prompts_arriving_together_are_prefilled_in_one_forward_and_decode_as_alone(
        demo_w8a16: Path, tiny_model_dir: Path) -> None:
    """Batched prefill: prompts of different lengths submitted at once share padded prefill forwards (a
    token budget of 24 holds several of them); each sequence's greedy tokens equal its tokens alone."""
    model = load_quantized(demo_w8a16, cpu, torch.float32)
    tok = load_tokenizer(tiny_model_dir)
    texts = ["the cat sees the dog .", "what color is the apple ? the apple is", "two dogs", "anna has a red ball",
             "the bird sings in the garden on monday . the"]
    ids = [tok(t)["input_ids"] for t in texts]
    alone = [list(stream(Engine(model, max_len=128), i, SamplingParams(max_tokens=8))) for i in ids]
    engine = Engine(model, max_len=128, slots=4)
    forwards = []
    batched = engine.prefill_many
    engine.prefill_many = lambda chunks: forwards.append(len(chunks)) or batched(chunks)
    sched = Scheduler(engine, prefill_chunk=24)
    seqs = [sched.submit(i, SamplingParams(max_tokens=8)) for i in ids]
    sched.run_until_done()
    assert [s.output_ids for s in seqs] == alone
    assert max(forwards) >= 2  # some forward prefilled more than one prompt


def test_int4_prefill_dequantizes_to_what_the_kernel_computes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """From `dequant_rows` rows on, a 4-bit linear runs on its weight dequantized from the packed layout
    (npuflow's or aten's): the same result as its int4 kernel up to bf16 rounding, for every linear of the
    demo model."""
    out = tmp_path / "w4a16"
    out.mkdir()
    quantize_dir(tiny_model_dir, out, QuantizationConfig(scheme="w4a16", group_size=32, sensitivity=False))
    model = load_quantized(out, cpu, torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, cpu.Int4PackedLinear)]
    assert linears and all(m.dequant_rows == (cpu.OWN_INT4_DEQUANT_ROWS if m.own else cpu.DEQUANT_ROWS)
                           for m in linears)
    assert all(m.own for m in linears) == cpu.npuflow_int4_ok(32, linears[0].in_features)
    for m in {m.in_features: m for m in linears}.values():
        x = torch.randn(m.dequant_rows, m.in_features).to(torch.bfloat16)
        kernel = m.kernel(x).float()
        got = m(x).float()
        assert (got - kernel).abs().max() <= 0.02 * kernel.abs().max()


@pytest.mark.parametrize("rows", [1, 3])
def test_single_query_attention_op_equals_sdpa_on_a_slice_of_the_cache(rows: int) -> None:
    from npuflow.runtime.engine import single_query_attention

    cache = torch.randn(4, 4, 256, 16)  # (slots, kv_heads, max_len, D)
    k, v = cache[:rows, :, :128], cache.flip(0)[:rows, :, :128]  # views, as the engine hands them over
    q = torch.randn(rows, 8, 1, 16)  # 8 query heads over 4 kv heads
    mask = torch.arange(128)[None, None, None, :] <= torch.tensor([100, 7, 127])[:rows, None, None, None]
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             attn_mask=mask, scale=0.25).transpose(1, 2)
    assert torch.allclose(single_query_attention(q, k, v, mask, 0.25), want, atol=1e-5)


@pytest.mark.parametrize("rows", [2, 4])  # 4 = every slot (contiguous blocks: one bmm each), 2: a slot range
def test_single_query_attention_on_cache_blocks_equals_sdpa(rows: int) -> None:
    from npuflow.runtime.engine import KV_BUCKET, dense_blocks, single_query_attention

    g = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(3, 4, 2, KV_BUCKET, 16, generator=g) for _ in range(2))  # (nb, slots, kvh, BLOCK, D)
    k, v = keys[:, :rows], values[:, :rows]  # what SlotCache.update hands over for slots 0..rows-1
    assert k.is_contiguous() == (rows == 4)
    q = torch.randn(rows, 6, 1, 16, generator=g)  # 6 query heads over 2 kv heads
    length = 3 * KV_BUCKET
    mask = torch.arange(length)[None, None, None, :] <= torch.tensor([300, 5, 383, 130])[:rows, None, None, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q, dense_blocks(k).repeat_interleave(3, 1), dense_blocks(v).repeat_interleave(3, 1), attn_mask=mask,
        scale=0.25).transpose(1, 2)
    assert torch.allclose(single_query_attention(q, k, v, mask, 0.25), want, atol=1e-5)


def test_compiled_engines_of_two_models_each_run_their_own_graphs(demo_w8a16: Path, tiny_model_dir: Path,
                                                                    tmp_path: Path, prompt) -> None:
    """Guards on the model's modules are dropped (decode overhead); graphs are kept per engine instead, so a
    second model of the same shapes (here W4A16: other modules, other kernels) never runs the first one's."""
    w4 = tmp_path / "w4a16"
    w4.mkdir()
    quantize_dir(tiny_model_dir, w4, QuantizationConfig(scheme="w4a16", group_size=32))
    models = [load_quantized(d, cpu, torch.bfloat16) for d in (demo_w8a16, w4)]
    eager = [generate(Engine(m, max_len=128), prompt, 16) for m in models]
    engines = [Engine(m, max_len=128, compile=True) for m in models]
    for _ in range(2):  # interleaved, as a champion and a challenger are served from one process
        assert [torch.equal(generate(e, prompt, 16), want) for e, want in zip(engines, eager, strict=True)] == [True, True]


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16", "w8a8-dynamic"])
def test_fused_projections_compute_what_the_separate_ones_do(tiny_model_dir: Path, tmp_path: Path, prompt,
                                                            scheme: str) -> None:
    """bf16 CPU models get q/k/v and gate/up as one linear each: the logits of a prefill and a decode step equal
    those of the separate projections (float32 accumulation differs only in rounding)."""
    from npuflow.runtime.loader import QuantLinear

    out = tmp_path / scheme
    out.mkdir()
    cfg = {"w4a16": {"group_size": 32}, "w8a8-dynamic": {"ignore": ("model.embed_tokens", "lm_head")}}.get(scheme, {})
    quantize_dir(tiny_model_dir, out, QuantizationConfig(scheme=scheme, **cfg))
    fused = load_quantized(out, cpu, torch.bfloat16)
    layer = fused.model.layers[0]
    assert type(layer.self_attn) is cpu.FusedQKVAttention and type(layer.mlp) is cpu.FusedGateUpMLP
    assert not hasattr(layer.self_attn, "q_proj") and layer.self_attn.qkv_sizes == [128, 64, 64]
    original = cpu.fuse_projections
    try:
        cpu.fuse_projections = lambda model: 0
        separate = load_quantized(out, cpu, torch.bfloat16)
    finally:
        cpu.fuse_projections = original
    assert isinstance(separate.model.layers[0].self_attn.q_proj, (QuantLinear, cpu.Int4PackedLinear))
    assert torch.equal(generate(Engine(fused, max_len=128), prompt, 12), generate(Engine(separate, max_len=128),
                                                                                    prompt, 12))
    with torch.inference_mode():
        la, lb = fused(prompt).logits.float(), separate(prompt).logits.float()
    assert (la - lb).abs().max() <= 0.02 * lb.abs().max()
