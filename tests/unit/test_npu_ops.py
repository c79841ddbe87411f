"""The torch_npu references compute what the HF / plain-torch code they replace computes, and the fused Llama is exact."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    apply_rotary_pos_emb,
    repeat_kv,
    rotate_half,
)

from npuflow.runtime.backends import npu_ops
from npuflow.runtime.backends.npu_model import (
    NpuAttention,
    NpuDecoderLayer,
    NpuMLP,
    NpuRMSNorm,
    apply_fused_ops,
)

ATOL = 1e-5
B, N, NKV, D = 2, 4, 2, 16  # batch, query heads, kv heads (GQA group of 2), head dim


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention (10x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _qkv(sq: int, skv: int | None = None):
    skv = sq if skv is None else skv
    return torch.randn(B, N, sq, D), torch.randn(B, NKV, skv, D), torch.randn(B, NKV, skv, D)  # BNSD


def _sdpa(q, k, v, **kw):
    """The plain-torch reference: SDPA over kv repeated to the query heads (HF's repeat_kv)."""
    return F.scaled_dot_product_attention(q, repeat_kv(k, N // NKV), repeat_kv(v, N // NKV), **kw)


# ---- norms ----------------------------------------------------------------------------------------------------


def test_rms_norm_matches_llama_rmsnorm():
    norm = LlamaRMSNorm(64, eps=1e-5)
    norm.weight.data = torch.randn(64)
    x = torch.randn(3, 5, 64)
    y, rstd = npu_ops.npu_rms_norm(x, norm.weight, epsilon=1e-5)
    torch.testing.assert_close(y, norm(x), atol=0, rtol=0)
    assert rstd.shape == (3, 5, 1) and rstd.dtype == torch.float32
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


def test_add_rms_norm_is_residual_add_then_norm():
    norm = LlamaRMSNorm(64)
    norm.weight.data = torch.randn(64)
    residual, attn_out = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    y, rstd, x = npu_ops.npu_add_rms_norm(residual, attn_out, norm.weight)
    torch.testing.assert_close(x, residual + attn_out, atol=0, rtol=0)
    torch.testing.assert_close(y, norm(residual + attn_out), atol=0, rtol=0)
    assert rstd.shape == (2, 7, 1)


def test_add_rms_norm_cast_gives_float32_and_input_dtype_outputs():
    x1, x2, gamma = (torch.randn(4, 64, dtype=torch.bfloat16) for _ in range(3))
    y1, y2, rstd, x = npu_ops.npu_add_rms_norm_cast(x1, x2, gamma[0])
    y, rstd_ref, x_ref = npu_ops.npu_add_rms_norm(x1, x2, gamma[0])
    assert (y1.dtype, y2.dtype, rstd.dtype, x.dtype) == (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16)
    torch.testing.assert_close(y2, y, atol=0, rtol=0)
    torch.testing.assert_close(y1.to(torch.bfloat16), y2, atol=0, rtol=0)
    torch.testing.assert_close(x, x_ref, atol=0, rtol=0)
    torch.testing.assert_close(rstd, rstd_ref, atol=0, rtol=0)


# ---- rotary ---------------------------------------------------------------------------------------------------


def _cos_sin(s: int):
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), 1.0 / (10000 ** (torch.arange(0, D, 2) / D)))
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, D), HF Llama's layout
    return emb.cos().expand(B, s, D), emb.sin().expand(B, s, D)  # (B, S, D)


def test_rotary_mul_matches_hf_apply_rotary_pos_emb():
    q, k, _ = _qkv(6)
    cos, sin = _cos_sin(6)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)  # unsqueeze_dim=1: BNSD
    q_np = npu_ops.npu_rotary_mul(q, cos.unsqueeze(1), sin.unsqueeze(1))
    k_np = npu_ops.npu_rotary_mul(k, cos.unsqueeze(1), sin.unsqueeze(1))
    torch.testing.assert_close(q_np, q_hf, atol=0, rtol=0)
    torch.testing.assert_close(k_np, k_hf, atol=0, rtol=0)


def test_rotary_mul_rotate_matrix_and_interleave_follow_the_documented_formulas():
    x, r1, r2 = torch.randn(1, 2, 5, D), torch.randn(1, 1, 5, D), torch.randn(1, 1, 5, D)
    rotate = torch.zeros(D, D)  # the docs' "half" example: x @ rotate == rotate_half(x)
    rotate[: D // 2, D // 2 :] = torch.eye(D // 2)
    rotate[D // 2 :, : D // 2] = -torch.eye(D // 2)
    torch.testing.assert_close(npu_ops.npu_rotary_mul(x, r1, r2, "half", rotate), r1 * x + r2 * rotate_half(x))
    pairs = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
    torch.testing.assert_close(npu_ops.npu_rotary_mul(x, r1, r2, rotary_mode="interleave"), r1 * x + r2 * pairs)


def test_apply_rotary_pos_emb_matches_hf_in_bsnd_and_updates_in_place():
    q, k, _ = _qkv(6)
    cos, sin = _cos_sin(6)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    q_bsnd, k_bsnd = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # (B, S, N, D)
    q_out, k_out = npu_ops.npu_apply_rotary_pos_emb(q_bsnd, k_bsnd, cos.unsqueeze(2), sin.unsqueeze(2))
    assert q_out is q_bsnd and k_out is k_bsnd
    torch.testing.assert_close(q_bsnd.transpose(1, 2), q_hf, atol=0, rtol=0)
    torch.testing.assert_close(k_bsnd.transpose(1, 2), k_hf, atol=0, rtol=0)


# ---- attention ------------------------------------------------------------------------------------------------


def _layout(x, layout):  # BNSD -> layout
    return {"BNSD": x, "BSND": x.transpose(1, 2), "BSH": x.transpose(1, 2).flatten(2)}[layout]


@pytest.mark.parametrize("layout", ["BNSD", "BSND", "BSH"])
@pytest.mark.parametrize("sparse_mode", [2, 3])
def test_fusion_attention_causal_gqa_matches_sdpa(layout, sparse_mode):
    q, k, v = _qkv(7)
    scale = D**-0.5
    tile = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    out = npu_ops.npu_fusion_attention(
        _layout(q, layout), _layout(k, layout), _layout(v, layout), N, layout, atten_mask=tile, scale=scale,
        sparse_mode=sparse_mode,
    )
    assert len(out) == 7 and out[1].shape == out[2].shape == (B, N, 7, 8) and out[4:] == (0, 0, 0)
    torch.testing.assert_close(out[0], _layout(_sdpa(q, k, v, is_causal=True, scale=scale), layout), atol=ATOL, rtol=0)


def test_fusion_attention_explicit_mask_modes_and_right_down_causal():
    q, k, v = _qkv(3, 8)  # 3 new queries after 5 cached positions
    keep = torch.ones(3, 8, dtype=torch.bool).tril(diagonal=5)  # query i sees keys <= i + 5
    expected = _sdpa(q, k, v, attn_mask=keep, scale=1.0)
    tile = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    down = npu_ops.npu_fusion_attention(q, k, v, N, "BNSD", atten_mask=tile, sparse_mode=3)[0]
    full = npu_ops.npu_fusion_attention(q, k, v, N, "BNSD", atten_mask=~keep, sparse_mode=1)[0]
    band = npu_ops.npu_fusion_attention(q, k, v, N, "BNSD", atten_mask=~keep, next_tockens=5)[0]  # mode 0
    for got in (down, full, band):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    no_mask = npu_ops.npu_fusion_attention(q, k, v, N, "BNSD", sparse_mode=3)[0]  # no mask: mode has no effect
    torch.testing.assert_close(no_mask, _sdpa(q, k, v, scale=1.0), atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["BNSD", "BSH"])
def test_incre_flash_attention_on_a_cache_is_the_last_row_of_full_attention(layout):
    q, k, v = _qkv(9)
    scale = D**-0.5
    full = _sdpa(q, k, v, is_causal=True, scale=scale)  # (B, N, 9, D)
    step = npu_ops.npu_incre_flash_attention(
        _layout(q[:, :, -1:], layout), _layout(k, layout), _layout(v, layout), num_heads=N, scale_value=scale,
        input_layout=layout, num_key_value_heads=NKV,
    )
    torch.testing.assert_close(step, _layout(full[:, :, -1:], layout), atol=ATOL, rtol=0)


def test_incre_flash_attention_masks_and_cache_lengths():
    q, k, v = _qkv(1, 8)
    lengths = [5, 8]  # batch 0 has 3 stale cache slots at the end
    keep = torch.arange(8) < torch.tensor(lengths).unsqueeze(-1)  # (B, Skv)
    expected = _sdpa(q, k, v, attn_mask=keep.view(B, 1, 1, 8), scale=1.0)
    by_len = npu_ops.npu_incre_flash_attention(
        q, k, v, actual_seq_lengths=lengths, num_heads=N, input_layout="BNSD", num_key_value_heads=NKV, scale_value=1.0
    )
    by_mask = npu_ops.npu_incre_flash_attention(
        q, k, v, atten_mask=~keep, num_heads=N, input_layout="BNSD", num_key_value_heads=NKV, scale_value=1.0
    )
    torch.testing.assert_close(by_len, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(by_mask, expected, atol=ATOL, rtol=0)


def test_incre_flash_attention_rejects_gqa_without_num_key_value_heads():
    q, k, v = _qkv(1, 8)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        npu_ops.npu_incre_flash_attention(q, k, v, num_heads=N, input_layout="BNSD")


def test_fused_infer_attention_score_prefill_and_decode():
    q, k, v = _qkv(6)
    tile = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    full = _sdpa(q, k, v, is_causal=True, scale=0.25)
    common = {"num_heads": N, "num_key_value_heads": NKV, "scale": 0.25, "input_layout": "BNSD"}
    prefill, lse = npu_ops.npu_fused_infer_attention_score(
        q, k, v, atten_mask=tile, sparse_mode=3, softmax_lse_flag=True, **common
    )
    torch.testing.assert_close(prefill, full, atol=ATOL, rtol=0)
    scores = (q @ repeat_kv(k, 2).transpose(-1, -2) * 0.25).masked_fill(tile[:6, :6], -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1, keepdim=True), atol=ATOL, rtol=0)
    decode, _ = npu_ops.npu_fused_infer_attention_score(q[:, :, -1:], k, v, **common)
    torch.testing.assert_close(decode, full[:, :, -1:], atol=ATOL, rtol=0)
    bsnd, _ = npu_ops.npu_fused_infer_attention_score(q, k, v, atten_mask=tile, sparse_mode=3,
                                                      **{**common, "input_layout": "BNSD_BSND"})
    torch.testing.assert_close(bsnd, full.transpose(1, 2), atol=ATOL, rtol=0)


# ---- MLP ------------------------------------------------------------------------------------------------------


def test_swiglu_is_silu_gate_times_up():
    gate, up = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    out = npu_ops.npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up, atol=0, rtol=0)


# ---- weight-only quantized matmul -----------------------------------------------------------------------------


def test_weight_quant_batchmatmul_per_channel():
    x = torch.randn(5, 96)
    w = torch.randint(-128, 128, (48, 96), dtype=torch.int8)  # (N, K) as stored by nn.Linear
    scale, offset, bias = torch.rand(48) / 50, torch.randn(48), torch.randn(48)
    expected = x @ ((w.float() + offset.unsqueeze(-1)) * scale.unsqueeze(-1)).T + bias
    got = npu_ops.npu_weight_quant_batchmatmul(x, w.t(), scale, offset, bias=bias)  # weight (K, N), a transposed view
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    no_offset = npu_ops.npu_weight_quant_batchmatmul(x, w.t(), antiquant_scale=scale.view(1, 48))
    torch.testing.assert_close(no_offset, x @ (w.float() * scale.unsqueeze(-1)).T, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("k", [96, 100])  # 100: a last, partial group
def test_weight_quant_batchmatmul_per_group(k):
    g, n = 32, 24
    x = torch.randn(3, k)
    w = torch.randint(-8, 8, (k, n), dtype=torch.int8)
    scale, offset = torch.rand(math.ceil(k / g), n), torch.randn(math.ceil(k / g), n)
    group = torch.arange(k) // g  # row r of the weight uses scale row r // g
    expected = x @ ((w.float() + offset[group]) * scale[group])
    got = npu_ops.npu_weight_quant_batchmatmul(x, w, scale, offset, antiquant_group_size=g)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


def test_weight_quant_batchmatmul_int4_packed_equals_int8():
    x = torch.randn(4, 64)
    w = torch.randint(-8, 8, (64, 32), dtype=torch.int32)  # (K, N)
    scale = torch.rand(2, 32)
    expected = npu_ops.npu_weight_quant_batchmatmul(x, w.to(torch.int8), scale, antiquant_group_size=32)
    packed_n = npu_ops.npu_convert_weight_to_int4pack(w)  # (K, N/8)
    packed_k = npu_ops.npu_convert_weight_to_int4pack(w.t().contiguous()).t()  # (N, K/8) passed as (K/8, N)
    for packed in (packed_n, packed_k):
        got = npu_ops.npu_weight_quant_batchmatmul(x, packed, scale, antiquant_group_size=32)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_weight_quant_batchmatmul_quantizes_the_output_to_int8():
    x, w, scale = torch.randn(2, 16), torch.randint(-8, 8, (16, 8), dtype=torch.int8), torch.rand(8)
    qs, qo = torch.full((8,), 4.0), torch.full((8,), 1.0)
    y = npu_ops.npu_weight_quant_batchmatmul(x, w, scale, quant_scale=qs, quant_offset=qo)
    assert y.dtype == torch.int8
    torch.testing.assert_close(y, torch.round((x @ (w * scale)) * 4 + 1).clamp(-128, 127).to(torch.int8))


def test_int4pack_layout_and_round_trip():
    row = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8]], dtype=torch.int32)
    packed = npu_ops.npu_convert_weight_to_int4pack(row)
    assert packed.shape == (1, 1) and packed.dtype == torch.int32
    assert packed.item() & 0xFFFFFFFF == 0x87654321  # value j at bits 4j..4j+3, two's-complement nibbles
    w = torch.randint(-8, 8, (16, 40), dtype=torch.int32)
    torch.testing.assert_close(npu_ops.unpack_int4pack(npu_ops.npu_convert_weight_to_int4pack(w)), w)
    with pytest.raises(ValueError, match="int4 range"):
        npu_ops.npu_convert_weight_to_int4pack(torch.full((1, 8), 8, dtype=torch.int32))


# ---- the whole model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(config).eval()


def _greedy(model, ids: torch.Tensor, steps: int, cache, attention_mask=None) -> list[torch.Tensor]:
    """Prefill then `steps` one-token decode steps through the cache; the logits of every call."""
    logits, mask = [], attention_mask
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache, use_cache=True)
        for _ in range(steps):
            logits.append(out.logits)
            nxt = out.logits[:, -1:].argmax(-1)
            mask = None if mask is None else torch.cat((mask, torch.ones_like(nxt)), dim=-1)
            out = model(nxt, attention_mask=mask, cache=out.cache, use_cache=True)
        logits.append(out.logits)
    return logits


@pytest.mark.parametrize("attention", ["fusion", "fused_infer"])
def test_fused_llama_matches_hf_for_prefill_and_greedy_decode(llama, attention):
    fused = apply_fused_ops(copy.deepcopy(llama), npu_ops, attention=attention)
    ids = torch.randint(0, 128, (1, 11))
    ref = _greedy(llama, ids, 6, DynamicCache(config=llama.config))
    got = _greedy(fused, ids, 6, DynamicCache(config=fused.config))
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=0)
    with torch.no_grad():
        expected = llama.generate(ids, max_new_tokens=6, do_sample=False)
        assert fused.generate(ids, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()


def test_fused_llama_honours_left_padding(llama):
    fused = apply_fused_ops(copy.deepcopy(llama), npu_ops)
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is a 6-token prompt, left-padded
    ref = _greedy(llama, ids, 3, DynamicCache(config=llama.config), attention_mask=mask)
    got = _greedy(fused, ids, 3, DynamicCache(config=fused.config), attention_mask=mask)
    torch.testing.assert_close(got[0][1, 3:], ref[0][1, 3:], atol=ATOL, rtol=0)  # real tokens only
    torch.testing.assert_close(got[0][0], ref[0][0], atol=ATOL, rtol=0)
    for r, g in zip(ref[1:], got[1:], strict=True):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=0)


def test_fused_llama_with_a_static_cache(llama):
    fused = apply_fused_ops(copy.deepcopy(llama), npu_ops)
    ids = torch.randint(0, 128, (1, 7))
    ref = _greedy(llama, ids, 3, StaticCache(config=llama.config, max_cache_len=16))
    got = _greedy(fused, ids, 3, StaticCache(config=fused.config, max_cache_len=16))
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=0)


def test_fused_llama_routes_every_block_through_the_ops(llama):
    calls: dict[str, int] = {}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return getattr(npu_ops, name)(*args, **kwargs)

        return call

    names = [n for n in npu_ops.__all__ if n.startswith("npu_")]
    recording = SimpleNamespace(**{n: counted(n) for n in names})
    fused = apply_fused_ops(copy.deepcopy(llama), recording)
    layers = llama.config.num_hidden_layers
    with torch.no_grad():
        out = fused(torch.randint(0, 128, (1, 5)), use_cache=True)
        prefill = dict(calls)
        fused(torch.randint(0, 128, (1, 1)), cache=out.cache, use_cache=True)
    assert prefill == {
        "npu_rms_norm": layers + 1,  # input_layernorm per layer + the final norm
        "npu_add_rms_norm": layers,
        "npu_rotary_mul": 2 * layers,  # q and k
        "npu_fusion_attention": layers,
        "npu_swiglu": layers,
    }
    decode = {n: calls[n] - prefill.get(n, 0) for n in calls}
    assert decode["npu_incre_flash_attention"] == layers and decode.get("npu_fusion_attention", 0) == 0


def test_apply_fused_ops_keeps_weights_and_module_types(llama):
    fused = apply_fused_ops(copy.deepcopy(llama), npu_ops)
    assert fused.state_dict().keys() == llama.state_dict().keys()
    layer = fused.model.layers[0]
    assert isinstance(layer, NpuDecoderLayer) and isinstance(layer.self_attn, NpuAttention)
    assert isinstance(layer.mlp, NpuMLP) and isinstance(fused.model.norm, NpuRMSNorm)
    assert layer.self_attn.q_proj is fused.model.layers[0].self_attn.q_proj  # Linear layers untouched
    again = apply_fused_ops(fused, npu_ops, attention="fused_infer")  # re-targets, does not stack
    assert type(again.model.layers[0]) is NpuDecoderLayer
    with pytest.raises(ValueError, match="choose one of"):
        apply_fused_ops(fused, npu_ops, attention="flash")
    with pytest.raises(ValueError, match="lacks the ops"):
        apply_fused_ops(copy.deepcopy(llama), SimpleNamespace())


@pytest.mark.parametrize("attention", ["fusion", "fused_infer"])
def test_the_serving_engine_runs_the_fused_llama_as_it_runs_hf(llama, attention):
    """The runtime's engine (slot cache, batched prefill, decode over cache blocks) over the fused blocks
    (pure-torch references of the torch_npu ops) gives HF's greedy tokens, prompts of different lengths."""
    from npuflow.runtime.engine import Engine, SamplingParams
    from npuflow.runtime.scheduler import Scheduler

    fused = apply_fused_ops(copy.deepcopy(llama), npu_ops, attention=attention)
    prompts = [torch.randint(0, 128, (1, n)) for n in (11, 4, 7)]
    with torch.no_grad():
        expected = [llama.generate(p, max_new_tokens=6, do_sample=False)[0, p.shape[1]:].tolist() for p in prompts]
    sched = Scheduler(Engine(fused, max_len=64, slots=4), prefill_chunk=64)
    seqs = [sched.submit(p[0].tolist(), SamplingParams(max_tokens=6)) for p in prompts]
    sched.run_until_done()
    assert [s.output_ids for s in seqs] == expected
